use super::*;
use crate::core::plane::EventBytes;
use crate::core::protocol::StoredBlock;
use crate::core::protocol::discovery::{ModelCardSummary, Role};
use crate::core::protocol::plane::FrameHeader;
use ratatui::Terminal;
use ratatui::backend::TestBackend;

const ENDPOINT: &str = "tcp://10.0.0.7:7100";

fn instance(id: u64) -> Instance {
    Instance {
        id,
        role: Role::Decode,
        model: "tiny-chat".into(),
        namespace: "prod".into(),
        request_addr: ENDPOINT.into(),
        event_addr: "tcp://0.0.0.0:7101".into(),
        transfer_addr: None,
        card: ModelCardSummary { block_size: 16, context_length: 4096, kv_blocks: 1000, tokenizer_hash: 1 },
        device: String::new(),
        http_addr: None,
        adapters: Vec::new(),
    }
}

fn delivery(publisher: u64, topic: Topic, seq: u64, continuity: Continuity, payload: Vec<u8>) -> Delivery {
    Delivery { header: FrameHeader { topic, publisher, seq }, continuity, payload: EventBytes::Opened(payload) }
}

fn stored(blocks: u64) -> KvEventBatch {
    let blocks = (0..blocks).map(|h| StoredBlock { hash: h, tokens_hash: h }).collect();
    KvEventBatch { worker_id: 7, events: vec![KvEvent::Stored { parent_hash: None, blocks }] }
}

/// A view of one worker that answered at `ENDPOINT`.
fn one_alive_worker() -> ClusterView {
    let mut view = ClusterView::new("prod");
    view.discovered(ENDPOINT.into());
    view.status(ENDPOINT, WorkerStatus::Alive(instance(7)));
    view
}

fn cell<'a>(view: &'a [[String; COLUMNS.len()]], row: usize, column: &str) -> &'a str {
    let at = COLUMNS.iter().position(|&c| c == column).unwrap();
    &view[row][at]
}

#[test]
fn a_worker_is_followed_from_discovery_through_its_events_to_its_departure() {
    let start = Instant::now();
    let mut view = ClusterView::new("prod");
    view.discovered(ENDPOINT.into());
    let rows = view.rows(start);
    assert_eq!((cell(&rows, 0, "STATE"), cell(&rows, 0, "MODEL")), ("connecting", "-"));
    // Silent past the time a worker may take to answer: not starting, unreachable.
    let silent = Instant::now() + view.answer_within + Duration::from_millis(1);
    assert_eq!(cell(&view.rows(silent), 0, "STATE"), "no answer");
    assert_eq!(view.json(silent)["workers"][0]["state"], "unreachable");

    view.status(ENDPOINT, WorkerStatus::Alive(instance(7)));
    let load = LoadMetrics {
        requests_running: 3,
        requests_waiting: 1,
        kv_active_blocks: 250,
        kv_total_blocks: 1000,
        kv_cached_blocks: 50,
        ..LoadMetrics::default()
    };
    view.deliver(ENDPOINT, delivery(7, Topic::Load, 0, Continuity::InOrder, load.to_bytes()), start);
    let stats = WorkerStats { accepted: 12, refused: 2, ..WorkerStats::default() };
    view.deliver(ENDPOINT, delivery(7, Topic::Stats, 0, Continuity::InOrder, stats.to_bytes()), start);
    view.deliver(ENDPOINT, delivery(7, Topic::Kv, 0, Continuity::InOrder, stored(4).to_bytes()), start);
    let later = start + Duration::from_secs(2);
    view.deliver(ENDPOINT, delivery(7, Topic::Kv, 3, Continuity::Gap(2), stored(2).to_bytes()), later);
    // A message for an endpoint the view does not hold, and a payload that does not decode: ignored, and counted.
    view.deliver("tcp://10.0.0.99:7100", delivery(99, Topic::Kv, 0, Continuity::InOrder, stored(1).to_bytes()), later);
    view.deliver(ENDPOINT, delivery(7, Topic::Load, 1, Continuity::InOrder, b"\xc1".to_vec()), later);

    let rows = view.rows(later);
    assert_eq!(cell(&rows, 0, "WORKER"), "0000000000000007");
    assert_eq!((cell(&rows, 0, "STATE"), cell(&rows, 0, "ROLE")), ("alive", "decode"));
    assert_eq!((cell(&rows, 0, "RUN"), cell(&rows, 0, "WAIT")), ("3", "1"));
    assert_eq!((cell(&rows, 0, "KV ACTIVE"), cell(&rows, 0, "KV HELD")), ("25.0%", "300/1000"));
    assert_eq!((cell(&rows, 0, "ROUTED"), cell(&rows, 0, "REFUSED")), ("12", "2"));
    assert_eq!(cell(&rows, 0, "KV XFER"), "-", "no transfer agent");
    assert_eq!(cell(&rows, 0, "DEVICE"), "-", "a record from discovery names no device");
    let worker = &view.workers[ENDPOINT];
    assert_eq!((worker.kv.events, worker.kv.stored_blocks, worker.lost_messages), (2, 6, 2));
    // Two events over the two seconds since the first one.
    assert_eq!(cell(&rows, 0, "KV EV/S"), "1");
    assert_eq!(view.malformed, 1);
    let summary = view.summary(later);
    assert!(summary.contains("1 worker, 1 alive; 3 running, 1 waiting; KV 25.0% active"), "{summary}");
    assert_eq!(view.kv_rate(later + RATE_WINDOW * 2), 0.0, "a quiet worker's rate decays");

    let json = view.json(later);
    let worker = &json["workers"][0];
    assert_eq!((worker["state"].as_str(), worker["record"]["id"].as_str()), (Some("alive"), Some("0000000000000007")));
    assert_eq!(
        (worker["load"]["requests_running"].as_u64(), worker["stats"]["accepted"].as_u64()),
        (Some(3), Some(12))
    );
    assert_eq!((worker["kv_events"].as_u64(), worker["lost_messages"].as_u64()), (Some(2), Some(2)));

    view.status(ENDPOINT, WorkerStatus::Lost);
    assert_eq!(cell(&view.rows(later), 0, "STATE"), "lost");
    let summary = view.summary(later);
    assert!(
        summary.contains("0 alive; 0 running, 0 waiting; KV - active"),
        "a lost worker's load is not counted: {summary}"
    );
    // Back under a new id: the old process's numbers are gone, the new one's messages count.
    // (now with a transfer agent bound to every interface: shown where this view reached the worker)
    let offering = Instance { transfer_addr: Some("tcp://0.0.0.0:7102".into()), ..instance(8) };
    view.status(ENDPOINT, WorkerStatus::Alive(offering));
    assert!(view.workers[ENDPOINT].load.is_none());
    assert_eq!(cell(&view.rows(later), 0, "KV XFER"), "tcp://10.0.0.7:7102");
    assert_eq!(cell(&view.rows(later), 0, "HANDOFFS"), "-", "no stats from the new process yet");
    let kv = crate::core::protocol::KvTransferStats { held: 0, read: 5, read_failed: 1, read_bytes: 1 << 20 };
    let stats = WorkerStats { kv, ..WorkerStats::default() };
    view.deliver(ENDPOINT, delivery(8, Topic::Stats, 0, Continuity::InOrder, stats.to_bytes()), later);
    assert_eq!(cell(&view.rows(later), 0, "HANDOFFS"), "5 (1 failed)");
    view.deliver(ENDPOINT, delivery(8, Topic::Kv, 0, Continuity::InOrder, stored(1).to_bytes()), later);
    assert_eq!(view.workers[ENDPOINT].kv.events, 1);

    view.removed(ENDPOINT);
    assert!(view.rows(later).is_empty());
    let summary = view.summary(later);
    assert!(summary.contains("0 workers") && summary.contains(" 0 KV events/s"), "{summary}");
}

#[test]
fn the_kv_event_rate_counts_the_window_even_when_an_older_sample_is_still_held() {
    let start = Instant::now();
    let mut view = one_alive_worker();
    let batch = |seq: u64| delivery(7, Topic::Kv, seq, Continuity::InOrder, stored(1).to_bytes());
    // A batch a second for six seconds: the first is outside the window by then, but nothing pruned it.
    for second in 0..6 {
        view.deliver(ENDPOINT, batch(second), start + Duration::from_secs(second));
    }
    let now = start + Duration::from_secs(6);
    let rate = view.kv_rate(now);
    assert!((0.8..=1.25).contains(&rate), "a steady batch a second reads {rate}");
    assert_eq!(view.kv_rate(start + Duration::from_secs(60)), 0.0, "and decays once quiet");
}

#[test]
fn a_worker_answering_for_another_namespace_leaves_the_view() {
    let now = Instant::now();
    let mut view = ClusterView::new("prod");
    // A hand-written cluster-file entry names no namespace, so discovery lists the worker anyway.
    view.discovered(ENDPOINT.into());
    let foreign = Instance { namespace: "staging".into(), ..instance(7) };
    assert!(!view.status(ENDPOINT, WorkerStatus::Alive(foreign)));
    assert!(view.workers.is_empty(), "{}", view.text(now));
    view.deliver(ENDPOINT, delivery(7, Topic::Kv, 0, Continuity::InOrder, stored(2).to_bytes()), now);
    assert!(view.workers.is_empty() && view.malformed == 0, "its events count for nobody");
    view.discovered(ENDPOINT.into());
    assert!(view.status(ENDPOINT, WorkerStatus::Alive(instance(7))), "one of ours at the same address is shown");
    assert_eq!(view.workers.len(), 1);
}

#[test]
fn the_text_snapshot_and_the_live_table_show_the_same_rows() {
    let now = Instant::now();
    let mut view = ClusterView::new("prod");
    view.discovered(ENDPOINT.into());
    view.discovered("tcp://10.0.0.8:7100".into());
    view.status(ENDPOINT, WorkerStatus::Alive(instance(7)));
    view.status("tcp://10.0.0.8:7100", WorkerStatus::Incompatible { theirs: 2 });

    let text = view.text(now);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "summary, header, two workers:\n{text}");
    assert!(lines[1].starts_with("WORKER"));
    assert!(lines[2].contains("tiny-chat") && lines[2].contains("alive"), "{text}");
    assert!(lines[3].contains("protocol v2"), "{text}");
    assert_eq!(view.json(now)["workers"][1]["state"], serde_json::json!({"incompatible": {"theirs": 2}}));
    // Columns line up: every row's ENDPOINT starts where the header's does.
    let at = lines[1].find("ENDPOINT").unwrap();
    assert!(lines[2..].iter().all(|line| line[at..].starts_with("tcp://")), "{text}");

    let mut terminal = Terminal::new(TestBackend::new(200, 8)).unwrap();
    let log = vec!["WARN cannot connect to worker at tcp://10.0.0.9:7100".to_string()];
    let mut screen = ui::Screen::default();
    terminal.draw(|frame| ui::draw(frame, &view, &mut screen, &log, now)).unwrap();
    let screen: String = terminal.backend().buffer().content().iter().map(|cell| cell.symbol()).collect();
    let shown =
        ["dynamo top", "2 workers, 1 alive", "WORKER", "0000000000000007", "alive", "protocol v2", "cannot connect"];
    for expected in shown {
        assert!(screen.contains(expected), "{expected:?} not on screen:\n{screen}");
    }
}

#[test]
fn the_highlight_scrolls_the_table_when_workers_outnumber_the_lines() {
    let now = Instant::now();
    let mut view = ClusterView::new("prod");
    let endpoint = |i: u16| format!("tcp://10.0.1.{i}:7100");
    (10..40).for_each(|i| view.discovered(endpoint(i)));
    let screen = |state: &mut ui::Screen| {
        let mut terminal = Terminal::new(TestBackend::new(160, 10)).unwrap();
        terminal.draw(|frame| ui::draw(frame, &view, state, &[], now)).unwrap();
        terminal.backend().buffer().content().iter().map(|cell| cell.symbol()).collect::<String>()
    };
    let mut state = ui::Screen::default();
    let first = screen(&mut state);
    assert!(first.contains(&endpoint(10)) && !first.contains(&endpoint(39)), "{first}");
    state.table.select_last();
    let last = screen(&mut state);
    assert!(last.contains(&endpoint(39)) && !last.contains(&endpoint(10)), "{last}");
}

#[test]
fn a_narrow_terminal_drops_whole_columns_least_useful_first_and_keeps_the_keys() {
    let now = Instant::now();
    let mut view = ClusterView::new("prod");
    view.discovered(ENDPOINT.into());
    view.status(ENDPOINT, WorkerStatus::Alive(instance(7)));
    let load = LoadMetrics {
        requests_running: 12,
        requests_waiting: 3,
        kv_active_blocks: 1500,
        kv_total_blocks: 16384,
        kv_cached_blocks: 28,
        ..LoadMetrics::default()
    };
    view.deliver(ENDPOINT, delivery(7, Topic::Load, 0, Continuity::InOrder, load.to_bytes()), now);
    let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
    let mut screen = ui::Screen::default();
    terminal.draw(|frame| ui::draw(frame, &view, &mut screen, &[], now)).unwrap();
    let buffer = terminal.backend().buffer();
    let lines: Vec<String> =
        (0..24).map(|y| (0..80).map(|x| buffer.cell((x, y)).map_or(" ", |c| c.symbol())).collect::<String>()).collect();
    let screen = lines.join("\n");
    for whole in ["0000000000000007", "alive", "12", "9.2%", "1528/16384", "q quits"] {
        assert!(screen.contains(whole), "{whole:?} cut or missing at 80 columns:\n{screen}");
    }
    // What did not fit is not there at all, not half there.
    assert!(!screen.contains("tcp://10.0.0.7"), "the endpoint column should have been dropped:\n{screen}");
    let widths = column_widths(&view.rows(now));
    let kept = ui::fitting_columns(&widths, 78);
    let used: usize = kept.iter().map(|&at| widths[at]).sum::<usize>() + kept.len() - 1;
    assert!(used <= 78 && kept.contains(&0) && kept.len() < COLUMNS.len(), "{kept:?}");
}

#[test]
fn a_planner_is_a_member_whose_latest_plan_is_shown_under_the_summary() {
    let now = Instant::now();
    let mut view = ClusterView::new("prod");
    view.discovered(ENDPOINT.into());
    view.status(ENDPOINT, WorkerStatus::Alive(instance(7)));
    let planner_at = "tcp://10.0.0.9:7200";
    view.discovered(planner_at.into());
    view.status(
        planner_at,
        WorkerStatus::Alive(Instance { role: Role::Planner, request_addr: planner_at.into(), ..instance(9) }),
    );
    assert_eq!(view.members(), ["planner 0000000000000009: no plan yet"]);
    let plan = Plan {
        decode: 3,
        prefill: 1,
        forecast: Some(crate::core::protocol::Forecast { requests: 120.0, input_tokens: 4.0e5, output_tokens: 2.0e4 }),
        reason: "decode: KV pressure 1.20 past 1.00".into(),
    };
    view.deliver(planner_at, delivery(9, Topic::Plan, 0, Continuity::InOrder, plan.to_bytes()), now);
    let text = view.text(now);
    assert!(
        text.contains(
            "planner 0000000000000009: 3 decode, 1 prefill workers; next interval 120 requests, 400000 prompt and \
             20000 output tokens (decode: KV pressure 1.20 past 1.00)"
        ),
        "{text}"
    );
    // It is a member, not a worker: the summary counts the one worker.
    assert!(view.summary(now).contains("1 worker, 1 alive"), "{}", view.summary(now));
    assert_eq!(view.json(now)["workers"][1]["plan"]["decode"], 3);
}

#[test]
fn a_routers_traffic_is_shown_under_the_summary() {
    let now = Instant::now();
    let mut view = ClusterView::new("prod");
    let router_at = "tcp://10.0.0.8:7300";
    view.discovered(router_at.into());
    view.status(
        router_at,
        WorkerStatus::Alive(Instance { role: Role::Router, request_addr: router_at.into(), ..instance(8) }),
    );
    assert_eq!(view.members(), ["router 0000000000000008: no report yet"]);
    let report = crate::core::protocol::RouterReport {
        interval_s: 2.0,
        requests_per_s: 12.5,
        refused_per_s: 0.5,
        output_tokens_per_s: 640.0,
        ttft_ms: Some(120.25),
        itl_ms: Some(8.0),
        ttft_p50_ms: Some(100.0),
        ttft_p99_ms: Some(410.5),
        prefix_hit: Some(0.44),
        workers: 3,
        models: vec![
            crate::core::protocol::ModelReport {
                model: "tiny-chat".into(),
                requests_per_s: 10.0,
                output_tokens_per_s: 600.0,
                ttft_p50_ms: Some(90.0),
                ttft_p99_ms: Some(400.0),
                prefix_hit: Some(0.5),
            },
            crate::core::protocol::ModelReport { model: "other".into(), requests_per_s: 2.5, ..Default::default() },
        ],
        routed: [("00000000000000a1", 10.0), ("00000000000000b2", 2.5)]
            .map(|(worker, requests_per_s)| crate::core::protocol::RoutedTo {
                worker: worker.into(),
                requests_per_s,
                ttft_p50_ms: Some(42.0),
            })
            .to_vec(),
        disagg: vec![("remote".into(), 2.0), ("local_short".into(), 0.5)],
        ..Default::default()
    };
    view.deliver(router_at, delivery(8, Topic::Router, 0, Continuity::InOrder, report.to_bytes()), now);
    assert_eq!(
        view.members(),
        [
            "router 0000000000000008: 12.5 requests/s (0.5 refused), 640 tokens/s, TTFT p50 100.0 / p99 410.5 ms, \
             ITL 8.0 ms, prefix hit 44%, 3 workers",
            "  model tiny-chat: 10.0 requests/s, 600 tokens/s, TTFT p50 90.0 / p99 400.0 ms, prefix hit 50%",
            "  model other: 2.5 requests/s, 0 tokens/s, TTFT -, prefix hit -",
            "  routed to: 00000000000000a1 10.0/s (80%, TTFT p50 42 ms) · 00000000000000b2 2.5/s (20%, TTFT p50 42 ms)",
            "  prefill: remote 2.0/s · local_short 0.5/s",
        ]
    );
    assert!(view.summary(now).contains("0 workers, 0 alive"), "{}", view.summary(now));
    assert_eq!(view.json(now)["workers"][0]["report"]["workers"], 3);
    assert_eq!(view.json(now)["workers"][0]["report"]["routed"][0]["worker"], "00000000000000a1", "ids as hex");
    // A worker the router names gets its median TTFT in its history.
    let worker_at = "tcp://10.0.0.9:7100";
    view.discovered(worker_at.into());
    view.status(worker_at, WorkerStatus::Alive(Instance { request_addr: worker_at.into(), ..instance(0xa1) }));
    let load = LoadMetrics { requests_running: 1, kv_total_blocks: 10, ..LoadMetrics::default() };
    view.deliver(worker_at, delivery(0xa1, Topic::Load, 0, Continuity::InOrder, load.to_bytes()), now);
    view.deliver(router_at, delivery(8, Topic::Router, 1, Continuity::InOrder, report.to_bytes()), now);
    assert_eq!(view.workers[worker_at].history.series(|s| s.ttft_ms), vec![42.0]);
}

/// Three alive workers of two models with different loads.
fn three_workers(now: Instant) -> ClusterView {
    let mut view = ClusterView::new("prod");
    for (id, model, running) in [(1, "tiny-chat", 9), (2, "tiny-other", 12), (3, "tiny-chat", 3)] {
        let endpoint = format!("tcp://10.0.0.{id}:7100");
        view.discovered(endpoint.clone());
        let record = Instance { model: model.into(), request_addr: endpoint.clone(), ..instance(id) };
        view.status(&endpoint, WorkerStatus::Alive(record));
        let load = LoadMetrics { requests_running: running, kv_total_blocks: 1000, ..LoadMetrics::default() };
        view.deliver(&endpoint, delivery(id, Topic::Load, 0, Continuity::InOrder, load.to_bytes()), now);
    }
    view
}

fn drawn(view: &ClusterView, screen: &mut ui::Screen, now: Instant) -> Vec<String> {
    drawn_at(view, screen, now, 200, 24)
}

fn drawn_at(view: &ClusterView, screen: &mut ui::Screen, now: Instant, width: u16, height: u16) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|frame| ui::draw(frame, view, screen, &[], now)).unwrap();
    let buffer = terminal.backend().buffer();
    (0..height).map(|y| (0..width).map(|x| buffer.cell((x, y)).map_or(" ", |c| c.symbol())).collect()).collect()
}

fn press(screen: &mut ui::Screen, keys: &str) -> ui::Flow {
    use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    let mut flow = ui::Flow::Continue;
    for key in keys.split(' ') {
        let code = match key {
            "Enter" => KeyCode::Enter,
            "Esc" => KeyCode::Esc,
            "Down" => KeyCode::Down,
            "Backspace" => KeyCode::Backspace,
            text => KeyCode::Char(text.chars().next().unwrap()),
        };
        flow = ui::update(screen, KeyEvent::new(code, KeyModifiers::NONE));
    }
    flow
}

/// The worker ids of the table's rows, top to bottom.
fn row_ids(lines: &[String]) -> Vec<String> {
    let words =
        |line: &String| line.split(|c: char| c.is_whitespace() || c == '│').map(String::from).collect::<Vec<_>>();
    lines.iter().filter_map(|line| words(line).into_iter().find(|w| w.starts_with("00000000000000"))).collect()
}

#[test]
fn s_sorts_by_the_next_column_numbers_as_numbers_and_past_the_last_unsorts() {
    let now = Instant::now();
    let view = three_workers(now);
    let mut screen = ui::Screen::default();
    let run = COLUMNS.iter().position(|&c| c == "RUN").unwrap();
    for _ in 0..=run {
        press(&mut screen, "s");
    }
    assert_eq!(screen.sort, Some(run));
    let lines = drawn(&view, &mut screen, now);
    // 3, 9, 12: as numbers, not as text (which puts 12 first).
    assert_eq!(row_ids(&lines), ["0000000000000003", "0000000000000001", "0000000000000002"], "{lines:#?}");
    assert!(lines[0].contains("sorted by RUN") && lines.iter().any(|l| l.contains("RUN▲")), "{lines:#?}");
    for _ in run + 1..COLUMNS.len() {
        press(&mut screen, "s");
    }
    assert_eq!(screen.sort, Some(COLUMNS.len() - 1));
    press(&mut screen, "s");
    assert_eq!(screen.sort, None, "past the last column: discovery's order again");
}

#[test]
fn slash_filters_the_rows_enter_keeps_the_filter_and_esc_clears_it() {
    let now = Instant::now();
    let view = three_workers(now);
    let mut screen = ui::Screen::default();
    press(&mut screen, "/ o t h e x Backspace r");
    assert_eq!((screen.mode, screen.filter.as_str()), (ui::Mode::Filtering, "other"));
    let lines = drawn(&view, &mut screen, now);
    assert_eq!(row_ids(&lines), ["0000000000000002"], "{lines:#?}");
    assert!(lines[0].contains("filter: other_"), "{}", lines[0]);
    // While typing, q is a letter, not quit.
    assert_eq!(press(&mut screen, "q Backspace Enter"), ui::Flow::Continue);
    assert_eq!((screen.mode, screen.filter.as_str()), (ui::Mode::Table, "other"));
    press(&mut screen, "Esc");
    assert_eq!(row_ids(&drawn(&view, &mut screen, now)).len(), 3);
}

#[test]
fn enter_shows_the_selected_worker_in_detail_and_help_lists_the_keys() {
    let now = Instant::now();
    let view = three_workers(now);
    let mut screen = ui::Screen::default();
    press(&mut screen, "Enter");
    assert_eq!(screen.mode, ui::Mode::Table, "nothing selected: no detail");
    press(&mut screen, "Down Down Enter");
    assert_eq!(screen.mode, ui::Mode::Detail);
    let detail = drawn(&view, &mut screen, now).join("\n");
    assert!(
        detail.contains("tcp://10.0.0.2:7100 · Esc back") && detail.contains("\"requests_running\": 12"),
        "{detail}"
    );
    press(&mut screen, "Esc ?");
    let help = drawn(&view, &mut screen, now).join("\n");
    assert!(help.contains("sort by the next column") && help.contains("any key closes"), "{help}");
    press(&mut screen, "x");
    assert_eq!(screen.mode, ui::Mode::Table);
    assert_eq!(press(&mut screen, "q"), ui::Flow::Quit);
}

#[test]
fn history_draws_each_workers_trend_in_the_table_and_the_clusters_in_the_header() {
    let start = Instant::now();
    let mut view = one_alive_worker();
    assert_eq!(cell(&view.rows(start), 0, "RUN TREND"), "-", "no report yet");
    for (second, running) in [0u32, 1, 2, 4, 8].into_iter().enumerate() {
        let at = start + Duration::from_secs(second as u64);
        let stats = WorkerStats { accepted: 10 * second as u64, ..WorkerStats::default() };
        view.deliver(ENDPOINT, delivery(7, Topic::Stats, second as u64, Continuity::InOrder, stats.to_bytes()), at);
        let load = LoadMetrics {
            requests_running: running,
            kv_active_blocks: 100 * u64::from(running),
            kv_total_blocks: 1000,
            max_running: 16,
            ..LoadMetrics::default()
        };
        view.deliver(ENDPOINT, delivery(7, Topic::Load, second as u64, Continuity::InOrder, load.to_bytes()), at);
    }
    let now = start + Duration::from_secs(4);
    assert_eq!(cell(&view.rows(now), 0, "RUN TREND"), "▁▂▃▅█");
    assert_eq!(cell(&view.rows(now), 0, "RUN"), "8/16", "out of its --max-num-seqs");
    let rates = view.workers[ENDPOINT].history.series(|s| s.requests_per_s);
    assert_eq!(rates, vec![10.0; 4], "ten more accepted each second");
    // The cluster's line: its totals once a second, drawn to the terminal's width.
    assert_eq!(view.history.series(|s| Some(s.running)), vec![0.0, 1.0, 2.0, 4.0, 8.0]);
    let line = ui::trend_line(&view.history, 120);
    assert!(line.starts_with("cluster, last minutes:") && line.contains("▅█ running 8"), "{line}");
    assert!(line.contains("KV 80.0%") && !line.contains("req/s"), "no router has reported yet: {line}");
    assert!(line.chars().count() <= 120, "{line}");
    assert!(ui::trend_line(&ClusterView::new("prod").history, 120).is_empty(), "nothing before the first sample");
    let mut screen = ui::Screen::default();
    let lines = drawn(&view, &mut screen, now);
    assert!(lines[1].starts_with("cluster, last minutes:"), "{lines:#?}");
    // The detail view gauges how full the selected worker is and charts its history, beside its record.
    press(&mut screen, "Down Enter");
    let detail = drawn(&view, &mut screen, now).join("\n");
    let titles =
        ["running: now 8, most 8 in the last 5 min", "KV active: now 80.0%, most 80.0%", "requests/s: now 10.0"];
    for title in titles.into_iter().chain(["KV active  80.0%", "running 8 of 16"]) {
        assert!(detail.contains(title), "{title}: {detail}");
    }
    assert!(detail.contains("\"requests_running\": 8"), "the record is still shown: {detail}");
}

#[test]
fn a_decode_workers_kv_reads_show_as_a_rate_in_its_row_and_the_clusters_line() {
    let start = Instant::now();
    let mut view = ClusterView::new("prod");
    view.discovered(ENDPOINT.into());
    let record = Instance { transfer_addr: Some("tcp://10.0.0.7:7200".into()), ..instance(7) };
    view.status(ENDPOINT, WorkerStatus::Alive(Instance { device: "cuda:0 NVIDIA H100".into(), ..record }));
    for second in 0..3u64 {
        let at = start + Duration::from_secs(second);
        let kv = crate::core::protocol::KvTransferStats {
            read: second,
            read_bytes: second * 2_000_000,
            ..Default::default()
        };
        let stats = WorkerStats { kv, ..WorkerStats::default() };
        view.deliver(ENDPOINT, delivery(7, Topic::Stats, second, Continuity::InOrder, stats.to_bytes()), at);
        let load = LoadMetrics {
            kv_total_blocks: 100,
            device_memory_used: 61_000_000_000,
            device_memory_total: 80_000_000_000,
            ..LoadMetrics::default()
        };
        view.deliver(ENDPOINT, delivery(7, Topic::Load, second, Continuity::InOrder, load.to_bytes()), at);
    }
    let now = start + Duration::from_secs(2);
    assert_eq!(cell(&view.rows(now), 0, "DEVICE"), "cuda:0 NVIDIA H100 61.0/80 GB", "its name, and its memory in use");
    assert_eq!(cell(&view.rows(now), 0, "HANDOFFS"), "2 2.0 MB/s");
    let line = ui::trend_line(&view.history, 160);
    assert!(line.contains("KV moved 2.0 MB/s"), "{line}");
}

#[test]
fn an_encode_workers_images_show_as_a_rate_in_its_row_and_the_clusters_line() {
    let start = Instant::now();
    let mut view = ClusterView::new("prod");
    view.discovered(ENDPOINT.into());
    let record = Instance { role: Role::Encode, transfer_addr: Some("tcp://10.0.0.7:7200".into()), ..instance(7) };
    view.status(ENDPOINT, WorkerStatus::Alive(record));
    assert_eq!(cell(&view.rows(start), 0, "IMAGES"), "-", "nothing known yet");
    for second in 0..3u64 {
        let at = start + Duration::from_secs(second);
        let images = crate::core::protocol::ImageStats { encoded: 4 * second, ..Default::default() };
        let stats = WorkerStats { images, ..WorkerStats::default() };
        view.deliver(ENDPOINT, delivery(7, Topic::Stats, second, Continuity::InOrder, stats.to_bytes()), at);
        let load = LoadMetrics { kv_total_blocks: 54, ..LoadMetrics::default() };
        view.deliver(ENDPOINT, delivery(7, Topic::Load, second, Continuity::InOrder, load.to_bytes()), at);
    }
    let now = start + Duration::from_secs(2);
    assert_eq!(cell(&view.rows(now), 0, "ROLE"), "encode");
    assert_eq!(cell(&view.rows(now), 0, "IMAGES"), "8 encoded 4.0/s");
    let line = ui::trend_line(&view.history, 160);
    assert!(line.contains("4.0 images/s"), "{line}");
    // A prefilling worker that read some from encode workers and failed one.
    let images = crate::core::protocol::ImageStats { encoded: 1, read: 5, read_failed: 1 };
    let stats = WorkerStats { images, ..WorkerStats::default() };
    view.deliver(ENDPOINT, delivery(7, Topic::Stats, 3, Continuity::InOrder, stats.to_bytes()), now);
    assert_eq!(
        cell(&view.rows(now), 0, "IMAGES"),
        "1 encoded, 5 read (1 failed) 4.0/s",
        "the rate of the last load report"
    );
}

#[test]
fn a_large_terminal_shows_every_column_the_history_and_every_worker_whole() {
    let start = Instant::now();
    let mut view = three_workers(start);
    for second in 1..=5u64 {
        let at = start + Duration::from_secs(second);
        for (id, running) in [(1u64, 9u32), (2, 12), (3, 3)] {
            let endpoint = format!("tcp://10.0.0.{id}:7100");
            let load = LoadMetrics {
                requests_running: running + second as u32,
                kv_total_blocks: 1000,
                max_running: 256,
                ..LoadMetrics::default()
            };
            view.deliver(&endpoint, delivery(id, Topic::Load, second, Continuity::InOrder, load.to_bytes()), at);
        }
    }
    let now = start + Duration::from_secs(5);
    let lines = drawn_at(&view, &mut ui::Screen::default(), now, 200, 50);
    let screen = lines.join("\n");
    assert!(lines[1].starts_with("cluster, last minutes:"), "{screen}");
    let header = lines.iter().find(|l| l.contains("WORKER")).expect("a header row");
    for column in COLUMNS {
        assert!(header.contains(column), "{column} missing at 200 columns:\n{screen}");
    }
    for (id, running) in [("0000000000000001", "14/256"), ("0000000000000002", "17/256"), ("0000000000000003", "8/256")]
    {
        let row = lines.iter().find(|l| l.contains(id)).unwrap_or_else(|| panic!("no row for {id}:\n{screen}"));
        assert!(row.contains(running) && row.contains("tcp://10.0.0."), "{row}");
    }
}
