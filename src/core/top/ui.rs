//! The live table, as bottom structures it: a `Screen` (what the operator chose: selection, sort, filter,
//! which view), `update` (a key changes it), and `draw` (the cluster view and the screen, to widgets), so
//! keys and drawing are tested without a terminal. Redrawn every `refresh` until q or Ctrl-C.
use super::history::{self, History};
use super::{COLUMNS, ClusterView, PeerState, column_widths};
use crate::core::telemetry::LogTail;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style, Stylize};
use ratatui::widgets::{Block, Borders, Clear, LineGauge, Paragraph, Row, Sparkline, Table, TableState};
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
    "RUN TREND",
    "ROUTED",
    "REFUSED",
    "DEVICE",
    "KV EV/S",
    "HANDOFFS",
    "IMAGES",
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
    let trend = trend_line(&view.history, usize::from(frame.area().width));
    let [header, trends, planned, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(u16::from(!trend.is_empty())),
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
    frame.render_widget(Paragraph::new(trend).fg(Color::Green), trends);
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
        let charted = selected.filter(|w| !w.history.is_empty());
        // Beside the record on a wide terminal, else above it in at most half the body: the record is what the
        // operator opened the view for.
        let (charts_area, record) = match charted {
            None => (Rect::default(), body),
            Some(_) if body.width >= 120 => {
                let [record, charts] =
                    Layout::horizontal([Constraint::Fill(1), Constraint::Percentage(45)]).areas(body);
                (charts, record)
            }
            Some(_) => {
                let charts = (CHARTS.len() as u16 * CHART_LINES).min(body.height / 2 / CHART_LINES * CHART_LINES);
                let charts = charts + GAUGES;
                let [charts, record] = Layout::vertical([Constraint::Length(charts), Constraint::Fill(1)]).areas(body);
                (charts, record)
            }
        };
        if let Some(worker) = charted {
            let [gauges, charts] =
                Layout::vertical([Constraint::Length(GAUGES), Constraint::Fill(1)]).areas(charts_area);
            draw_gauges(frame, worker, gauges);
            draw_charts(frame, &worker.history, charts);
        }
        frame.render_widget(Paragraph::new(text).block(Block::bordered().title(title)), record);
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

/// A series of a history: a sample's value, where known.
type Pick = fn(&history::Sample) -> Option<f64>;

/// The series a worker's detail view charts: a title, the value of a sample, and how to print it.
const CHARTS: [(&str, Pick, Unit); 5] = [
    ("running", |s| Some(s.running), Unit::Count),
    ("waiting", |s| Some(s.waiting), Unit::Count),
    ("KV active", |s| Some(s.kv_active), Unit::Share),
    ("requests/s", |s| s.requests_per_s, Unit::Rate),
    ("TTFT p50 ms (routers')", |s| s.ttft_ms, Unit::Count),
];
/// Each chart's lines: its title, then the bars.
const CHART_LINES: u16 = 3;

#[derive(Debug, Clone, Copy)]
enum Unit {
    Count,
    Share,
    Rate,
}

impl Unit {
    fn show(self, value: f64) -> String {
        match self {
            Unit::Count => format!("{value:.0}"),
            Unit::Share => format!("{:.1}%", 100.0 * value),
            Unit::Rate => format!("{value:.1}"),
        }
    }

    /// Bars are integers: shares in tenths of a percent, rates in tenths.
    fn bar(self, value: f64) -> u64 {
        match self {
            Unit::Count => value.max(0.0).round() as u64,
            Unit::Share => (value.max(0.0) * 1000.0).round() as u64,
            Unit::Rate => (value.max(0.0) * 10.0).round() as u64,
        }
    }

    /// The smallest top of scale: one request, 10 % of the cache, one request a second.
    fn floor(self) -> u64 {
        match self {
            Unit::Count => 1,
            Unit::Share => 100,
            Unit::Rate => 10,
        }
    }
}

/// Lines the detail view's gauges take: KV in use, and running of the most it runs.
const GAUGES: u16 = 2;

/// How full a worker is now: its KV in use by running requests, and its running requests against the most it
/// runs at once (`--max-num-seqs`) where it says.
fn draw_gauges(frame: &mut Frame, worker: &super::WorkerView, area: Rect) {
    let Some(load) = worker.load else { return };
    let [kv_area, running_area] = Layout::vertical([Constraint::Length(1); 2]).areas(area);
    let kv = load.kv_active_blocks as f64 / load.kv_total_blocks.max(1) as f64;
    let label = format!("KV active {:>5.1}% ", 100.0 * kv);
    frame.render_widget(LineGauge::default().ratio(kv.clamp(0.0, 1.0)).label(label).fg(Color::Green), kv_area);
    let (running, most) = (load.requests_running, load.max_running);
    let (ratio, label) = match most {
        0 => (0.0, format!("running {running} (its limit unknown) ")),
        most => (f64::from(running) / f64::from(most), format!("running {running} of {most} ")),
    };
    frame.render_widget(LineGauge::default().ratio(ratio.clamp(0.0, 1.0)).label(label).fg(Color::Green), running_area);
}

/// A worker's history as bar charts, the latest on the right: as many as fit in `area`, in `CHARTS` order.
fn draw_charts(frame: &mut Frame, history: &History, area: Rect) {
    let fit = usize::from(area.height / CHART_LINES).min(CHARTS.len());
    let lines = usize::from(area.height) / fit.max(1);
    let areas = Layout::vertical(vec![Constraint::Length(lines as u16); fit]).split(area);
    for ((name, pick, unit), &chart) in CHARTS.iter().zip(areas.iter()) {
        let values = history.series(pick);
        let width = usize::from(chart.width);
        let shown = &values[values.len().saturating_sub(width)..];
        let bars: Vec<u64> = shown.iter().map(|&v| unit.bar(v)).collect();
        let top = bars.iter().copied().max().unwrap_or(0).max(unit.floor());
        let now = values.last().map_or_else(|| "-".to_string(), |&v| unit.show(v));
        let most = values.iter().copied().reduce(f64::max).map_or_else(|| "-".to_string(), |v| unit.show(v));
        let title = format!(" {name}: now {now}, most {most} in the last {} min ", history::KEPT.as_secs() / 60);
        let sparkline =
            Sparkline::default().data(bars).max(top).block(Block::default().borders(Borders::TOP).title(title));
        frame.render_widget(sparkline.fg(Color::Green), chart);
    }
}

/// The cluster's history in one line of `width` characters: running, waiting and KV in use, and what the
/// routers report (requests per second, median TTFT) once they have; empty before the first sample.
pub fn trend_line(history: &History, width: usize) -> String {
    let Some(last) = history.last() else { return String::new() };
    let mut parts: Vec<(String, Vec<f64>, f64)> = vec![
        (format!("running {:.0}", last.running), history.series(|s| Some(s.running)), 1.0),
        (format!("waiting {:.0}", last.waiting), history.series(|s| Some(s.waiting)), 1.0),
    ];
    if !last.kv_active.is_nan() {
        let kv = history.series(|s| (!s.kv_active.is_nan()).then_some(s.kv_active));
        parts.push((format!("KV {:.1}%", 100.0 * last.kv_active), kv, 0.1));
    }
    if let Some(rate) = last.requests_per_s {
        parts.push((format!("{rate:.1} req/s"), history.series(|s| s.requests_per_s), 1.0));
    }
    if let Some(ttft) = last.ttft_ms {
        parts.push((format!("TTFT p50 {ttft:.0} ms"), history.series(|s| s.ttft_ms), 1.0));
    }
    if let Some(moved) = last.kv_read_per_s {
        let label = format!("KV moved {}", super::bytes_per_s(moved));
        parts.push((label, history.series(|s| s.kv_read_per_s), 1e6));
    }
    if let Some(images) = last.images_per_s {
        parts.push((format!("{images:.1} images/s"), history.series(|s| s.images_per_s), 1.0));
    }
    let lead = "cluster, last minutes:";
    let labels: usize = parts.iter().map(|(label, ..)| label.chars().count() + 3).sum::<usize>() + lead.len();
    let each = (width.saturating_sub(labels) / parts.len()).min(60);
    let drawn: Vec<String> = parts
        .iter()
        .map(|(label, values, floor)| match each {
            0 => label.clone(),
            _ => format!("{} {label}", history::sparkline(values, each, *floor)),
        })
        .collect();
    format!("{lead} {}", drawn.join(" · "))
}

/// A `width` × `height` rectangle in the middle of `area` (smaller if it does not fit).
fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let (width, height) = (width.min(area.width), height.min(area.height));
    Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height }
}
