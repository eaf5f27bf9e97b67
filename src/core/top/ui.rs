//! The live table: redrawn every `refresh` from the shared view until q, Esc or Ctrl-C; arrows (or j/k,
//! g/G) move a highlight through the workers, scrolling when there are more than the screen holds.
use super::{COLUMNS, ClusterView, PeerState, column_widths};
use crate::core::telemetry::LogTail;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Style, Stylize};
use ratatui::widgets::{Block, Paragraph, Row, Table, TableState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines of the log shown under the table.
const LOG_LINES: usize = 3;

/// Takes over the terminal (alternate screen, raw mode) and gives it back however the loop ends.
pub fn run(view: &Mutex<ClusterView>, logs: &LogTail, refresh: Duration) -> std::io::Result<()> {
    let mut terminal = ratatui::try_init()?;
    let mut table = TableState::default();
    let shown = (|| loop {
        terminal.draw(|frame| {
            let view = view.lock().unwrap_or_else(|p| p.into_inner());
            draw(frame, &view, &mut table, &logs.last(LOG_LINES), Instant::now())
        })?;
        if event::poll(refresh)?
            && let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
        {
            match key_action(key) {
                Action::Quit => return Ok(()),
                Action::Down => table.select_next(),
                Action::Up => table.select_previous(),
                Action::First => table.select_first(),
                Action::Last => table.select_last(),
                Action::Nothing => {}
            }
        }
    })();
    let restored = ratatui::try_restore();
    shown.and(restored)
}

enum Action {
    Quit,
    Down,
    Up,
    First,
    Last,
    Nothing,
}

fn key_action(key: KeyEvent) -> Action {
    match key.code {
        KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
        // Raw mode turns Ctrl-C into a key press instead of a signal.
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Action::Quit,
        KeyCode::Down | KeyCode::Char('j') => Action::Down,
        KeyCode::Up | KeyCode::Char('k') => Action::Up,
        KeyCode::Home | KeyCode::Char('g') => Action::First,
        KeyCode::End | KeyCode::Char('G') => Action::Last,
        _ => Action::Nothing,
    }
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

pub fn draw(frame: &mut Frame, view: &ClusterView, table_state: &mut TableState, log: &[String], now: Instant) {
    let plans = view.members();
    let [header, planned, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(plans.len() as u16),
        Constraint::Fill(1),
        Constraint::Length(log.len() as u16),
    ])
    .areas(frame.area());
    // The keys first: a narrow terminal cuts the end of the line.
    frame.render_widget(Paragraph::new(format!("dynamo top · ↑↓ move, q quits · {}", view.summary(now))), header);
    frame.render_widget(Paragraph::new(plans.join("\n")).fg(Color::Cyan), planned);
    let rows = view.rows(now);
    // The borders take two columns; whole columns are dropped, least useful first, rather than values cut.
    let all_widths = column_widths(&rows);
    let shown = fitting_columns(&all_widths, usize::from(body.width.saturating_sub(2)));
    let widths: Vec<Constraint> = shown.iter().map(|&at| Constraint::Length(all_widths[at] as u16)).collect();
    let header_row: Vec<&str> = shown.iter().map(|&at| COLUMNS[at]).collect();
    // Rows come in the order of `view.workers`.
    let styled = view.workers.values().zip(rows.iter()).map(|(worker, row)| {
        let row: Vec<String> = shown.iter().map(|&at| row[at].clone()).collect();
        let style = match view.state(worker, now) {
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
    frame.render_stateful_widget(table, body, table_state);
    frame.render_widget(Paragraph::new(log.join("\n")).fg(Color::Yellow), footer);
}
