//! The live table, as bottom structures it: a `Screen` (what the operator chose: selection, sort, filter,
//! which view), `update` (a key changes it), and `draw` (the cluster view and the screen, to widgets), so
//! keys and drawing are tested without a terminal. Redrawn every `refresh` until q or Ctrl-C.
use super::{COLUMNS, ClusterView, PeerState, column_widths};
use crate::core::telemetry::LogTail;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style, Stylize};
use ratatui::widgets::{Block, Clear, Paragraph, Row, Table, TableState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines of the log shown under the table.
const LOG_LINES: usize = 3;

/// The keys, as the help overlay and `dynamo top --help` list them.
pub const KEYS: &str = "\
↑ ↓ or j k   move          g G    first, last
s            sort by the next column (again: the one after; past the last: unsorted)
/            filter: rows containing the text typed (Enter keeps it, Esc clears it)
Enter        the selected worker in detail: its record, load and counters
?            this help      Esc    back     q or Ctrl-C   quit";

/// What the operator chose to see.
#[derive(Debug, Default)]
pub struct Screen {
    pub table: TableState,
    /// The column rows are sorted by (an index into `COLUMNS`), or discovery's order.
    pub sort: Option<usize>,
    /// Only rows with a cell containing this (case-insensitive) are shown.
    pub filter: String,
    pub mode: Mode,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Table,
    Help,
    /// Typing the filter.
    Filtering,
    /// The selected worker, in full.
    Detail,
}

/// Takes over the terminal (alternate screen, raw mode) and gives it back however the loop ends.
pub fn run(view: &Mutex<ClusterView>, logs: &LogTail, refresh: Duration) -> std::io::Result<()> {
    let mut terminal = ratatui::try_init()?;
    let mut screen = Screen::default();
    let shown = (|| loop {
        terminal.draw(|frame| {
            let view = view.lock().unwrap_or_else(|p| p.into_inner());
            draw(frame, &view, &mut screen, &logs.last(LOG_LINES), Instant::now())
        })?;
        if event::poll(refresh)?
            && let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
            && update(&mut screen, key) == Flow::Quit
        {
            return Ok(());
        }
    })();
    let restored = ratatui::try_restore();
    shown.and(restored)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Quit,
}

/// What a key does to the screen.
pub fn update(screen: &mut Screen, key: KeyEvent) -> Flow {
    // Raw mode turns Ctrl-C into a key press instead of a signal.
    if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL) {
        return Flow::Quit;
    }
    match (screen.mode, key.code) {
        (Mode::Filtering, KeyCode::Enter) => screen.mode = Mode::Table,
        (Mode::Filtering, KeyCode::Esc) => {
            screen.filter.clear();
            screen.mode = Mode::Table;
        }
        (Mode::Filtering, KeyCode::Backspace) => {
            screen.filter.pop();
        }
        (Mode::Filtering, KeyCode::Char(c)) => {
            screen.filter.push(c);
            screen.table.select_first();
        }
        (Mode::Filtering, _) => {}
        (_, KeyCode::Char('q')) => return Flow::Quit,
        (Mode::Help | Mode::Detail, _) => screen.mode = Mode::Table,
        (Mode::Table, KeyCode::Esc) => screen.filter.clear(),
        (Mode::Table, KeyCode::Char('?')) => screen.mode = Mode::Help,
        (Mode::Table, KeyCode::Char('/')) => screen.mode = Mode::Filtering,
        (Mode::Table, KeyCode::Enter) if screen.table.selected().is_some() => screen.mode = Mode::Detail,
        (Mode::Table, KeyCode::Char('s')) => {
            screen.sort = match screen.sort {
                None => Some(0),
                Some(at) if at + 1 < COLUMNS.len() => Some(at + 1),
                Some(_) => None,
            };
        }
        (Mode::Table, KeyCode::Down | KeyCode::Char('j')) => screen.table.select_next(),
        (Mode::Table, KeyCode::Up | KeyCode::Char('k')) => screen.table.select_previous(),
        (Mode::Table, KeyCode::Home | KeyCode::Char('g')) => screen.table.select_first(),
        (Mode::Table, KeyCode::End | KeyCode::Char('G')) => screen.table.select_last(),
        (Mode::Table, _) => {}
    }
    Flow::Continue
}

/// Columns by how much an operator needs them: a narrow terminal keeps the first that fit.
const PRIORITY: [&str; COLUMNS.len()] = [
    "WORKER",
    "STATE",
    "RUN",
    "WAIT",
    "KV ACTIVE",
    "ROLE",
    "KV HELD",
    "MODEL",
    "ROUTED",
    "REFUSED",
    "KV EV/S",
    "HANDOFFS",
    "ENDPOINT",
    "KV XFER",
];

/// The columns (indices into `COLUMNS`, in its order) that fit whole in `width`, one space between each.
pub fn fitting_columns(widths: &[usize; COLUMNS.len()], width: usize) -> Vec<usize> {
    let mut kept = Vec::new();
    let mut used = 0;
    for name in PRIORITY {
        let Some(at) = COLUMNS.iter().position(|&c| c == name) else { continue };
        let needed = widths[at] + usize::from(!kept.is_empty());
        if used + needed <= width {
            used += needed;
            kept.push(at);
        }
    }
    kept.sort_unstable();
    kept
}

/// The rows shown (their indices into the view's workers, in `view.workers` order), filtered and sorted as
/// the screen says.
pub fn shown_rows(screen: &Screen, rows: &[[String; COLUMNS.len()]]) -> Vec<usize> {
    let filter = screen.filter.to_lowercase();
    let mut shown: Vec<usize> = (0..rows.len())
        .filter(|&at| filter.is_empty() || rows[at].iter().any(|cell| cell.to_lowercase().contains(&filter)))
        .collect();
    if let Some(column) = screen.sort {
        // Numbers as numbers ("12" after "9", "9.2%" before "10.0%"), the rest as text.
        let number = |cell: &str| cell.trim_end_matches('%').split('/').next().and_then(|n| n.parse::<f64>().ok());
        shown.sort_by(|&a, &b| {
            let (a, b) = (&rows[a][column], &rows[b][column]);
            match (number(a), number(b)) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                _ => a.cmp(b),
            }
        });
    }
    shown
}

pub fn draw(frame: &mut Frame, view: &ClusterView, screen: &mut Screen, log: &[String], now: Instant) {
    let members = view.members();
    let [header, planned, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(members.len() as u16),
        Constraint::Fill(1),
        Constraint::Length(log.len() as u16),
    ])
    .areas(frame.area());
    let sorted = screen.sort.map_or_else(String::new, |at| format!(" · sorted by {}", COLUMNS[at]));
    let filtered = match (screen.mode, screen.filter.is_empty()) {
        (Mode::Filtering, _) => format!(" · filter: {}_", screen.filter),
        (_, false) => format!(" · filter: {}", screen.filter),
        _ => String::new(),
    };
    // The keys first: a narrow terminal cuts the end of the line.
    let title = format!("dynamo top · ? help, q quits{sorted}{filtered} · {}", view.summary(now));
    frame.render_widget(Paragraph::new(title), header);
    frame.render_widget(Paragraph::new(members.join("\n")).fg(Color::Cyan), planned);
    let rows = view.rows(now);
    let shown = shown_rows(screen, &rows);
    let workers: Vec<&super::WorkerView> = view.workers.values().collect();
    if screen.mode == Mode::Detail {
        let selected = screen.table.selected().and_then(|at| shown.get(at)).map(|&at| workers[at]);
        let text = selected.map_or_else(
            || "no worker selected".to_string(),
            |worker| serde_json::to_string_pretty(&view.member_json(worker, now)).unwrap_or_default(),
        );
        let title = selected.map_or_else(String::new, |w| format!(" {} · Esc back ", w.endpoint));
        frame.render_widget(Paragraph::new(text).block(Block::bordered().title(title)), body);
    } else {
        draw_table(frame, view, screen, body, &rows, &shown, now);
    }
    frame.render_widget(Paragraph::new(log.join("\n")).fg(Color::Yellow), footer);
    if screen.mode == Mode::Help {
        let area = centered(frame.area(), 84, KEYS.lines().count() as u16 + 2);
        frame.render_widget(Clear, area);
        frame.render_widget(Paragraph::new(KEYS).block(Block::bordered().title(" keys · any key closes ")), area);
    }
}

fn draw_table(
    frame: &mut Frame,
    view: &ClusterView,
    screen: &mut Screen,
    body: Rect,
    rows: &[[String; COLUMNS.len()]],
    shown: &[usize],
    now: Instant,
) {
    let workers: Vec<&super::WorkerView> = view.workers.values().collect();
    let shown_cells: Vec<[String; COLUMNS.len()]> = shown.iter().map(|&at| rows[at].clone()).collect();
    // The borders take two columns; whole columns are dropped, least useful first, rather than values cut.
    let mut all_widths = column_widths(&shown_cells);
    if let Some(at) = screen.sort {
        // Room for the sort mark.
        all_widths[at] = all_widths[at].max(COLUMNS[at].chars().count() + 1);
    }
    let columns = fitting_columns(&all_widths, usize::from(body.width.saturating_sub(2)));
    let widths: Vec<Constraint> = columns.iter().map(|&at| Constraint::Length(all_widths[at] as u16)).collect();
    let header_row: Vec<String> = (columns.iter())
        .map(|&at| if screen.sort == Some(at) { format!("{}▲", COLUMNS[at]) } else { COLUMNS[at].to_string() })
        .collect();
    let styled = shown.iter().zip(&shown_cells).map(|(&at, row)| {
        let row: Vec<String> = columns.iter().map(|&column| row[column].clone()).collect();
        let style = match view.state(workers[at], now) {
            PeerState::Alive if workers[at].load.is_some_and(|l| l.engine_down) => Style::default().fg(Color::Red),
            PeerState::Alive => Style::default(),
            PeerState::Connecting => Style::default().fg(Color::DarkGray),
            PeerState::Unreachable | PeerState::Lost | PeerState::Incompatible { .. } => {
                Style::default().fg(Color::Red)
            }
        };
        Row::new(row).style(style)
    });
    let table = Table::new(styled, widths)
        .header(Row::new(header_row).bold())
        .row_highlight_style(Style::default().reversed())
        .block(Block::bordered().title(" workers "));
    frame.render_stateful_widget(table, body, &mut screen.table);
}

/// A `width` × `height` rectangle in the middle of `area` (smaller if it does not fit).
fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let (width, height) = (width.min(area.width), height.min(area.height));
    Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height }
}
