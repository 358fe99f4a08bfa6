//! The full-screen view of `top`: panes for the flow (rates, latency), the
//! shards' rings, storage (spool, writers), dead letters by reason,
//! analytics, and the last alerts as they come. The terminal is restored
//! on `q`, on an error and on a panic (ratatui's `init`/`restore`).

use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use ratatui::Frame;

use super::figures::{bytes, up, Figures, RecentAlert};
use super::{alerts, read, Reading, TopError};

/// Draws every second until `q` (or `until`).
pub fn run(url: &str, addr: &str, first: Reading, until: Option<Instant>) -> Result<(), TopError> {
    let mut terminal = ratatui::init();
    let result = refresh_loop(&mut terminal, url, addr, first, until);
    ratatui::restore();
    result
}

fn refresh_loop(
    terminal: &mut ratatui::DefaultTerminal,
    url: &str,
    addr: &str,
    mut last: Reading,
    until: Option<Instant>,
) -> Result<(), TopError> {
    let mut figures = Figures::default();
    let mut recent: Vec<RecentAlert> = Vec::new();
    let mut next = Instant::now();
    loop {
        if Instant::now() >= next {
            next = Instant::now() + Duration::from_secs(1);
            let answering = match read(addr) {
                Some(now) => {
                    if now.secs_since(&last) > 0.2 {
                        figures = now.figures_since(&last);
                        last = now;
                    }
                    recent = alerts(addr);
                    true
                }
                None => false,
            };
            terminal.draw(|frame| draw(frame, url, answering, &figures, &recent))?;
        }
        if until.is_some_and(|t| Instant::now() >= t) {
            return Ok(());
        }
        let wait = next.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            if let Event::Key(key) = event::read()? {
                if key.kind == KeyEventKind::Press
                    && matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                {
                    return Ok(());
                }
            }
        }
    }
}

fn pane(title: &str) -> Block<'_> {
    Block::default().borders(Borders::ALL).title(Span::styled(
        title,
        Style::default().add_modifier(Modifier::BOLD),
    ))
}

fn row<'a>(name: &'a str, value: String) -> Row<'a> {
    Row::new(vec![name.to_string(), value])
}

fn draw(frame: &mut Frame, url: &str, answering: bool, f: &Figures, recent: &[RecentAlert]) {
    let state = |ok: bool| {
        Span::styled(
            up(ok),
            Style::default().fg(if ok { Color::Green } else { Color::Red }),
        )
    };
    let header = Line::from(vec![
        Span::styled(
            "edge-gateway top ",
            Style::default().add_modifier(Modifier::BOLD),
        ),
        Span::raw(format!("{url}  ")),
        Span::raw(if answering { "" } else { "NOT ANSWERING  " }),
        Span::raw("database "),
        state(f.db_connected),
        Span::raw("  broker "),
        state(f.mqtt_connected),
        Span::raw("  (q quits)"),
    ]);
    let [top, middle, bottom, alerts_area] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Min(5),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header), top);

    let [flow, shards] =
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(middle);
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0} ms"));
    let widths = [Constraint::Length(26), Constraint::Min(10)];
    frame.render_widget(
        Table::new(
            vec![
                row("intake, messages/s", format!("{:.0}", f.received_per_s)),
                row("decoded, readings/s", format!("{:.0}", f.decoded_per_s)),
                row("committed, readings/s", format!("{:.0}", f.committed_per_s)),
                row("acked, messages/s", format!("{:.0}", f.acked_per_s)),
                row(
                    "in flight / not durable",
                    format!("{:.0} / {:.0}", f.in_flight, f.not_durable),
                ),
                row("publish-to-commit p50", ms(f.p50_ms)),
                row("publish-to-commit p99", ms(f.p99_ms)),
                row("readings committed", format!("{:.0}", f.readings_committed)),
            ],
            widths,
        )
        .block(pane("Flow")),
        flow,
    );
    let queues: Vec<Row> =
        f.rings
            .iter()
            .map(|(shard, n)| Row::new(vec![format!("shard {shard} ring"), format!("{n:.0}")]))
            .chain(f.writer_queues.iter().map(|(writer, n)| {
                Row::new(vec![format!("writer {writer} queue"), format!("{n:.0}")])
            }))
            .collect();
    frame.render_widget(
        Table::new(queues, widths).block(pane("Queues (messages, batches)")),
        shards,
    );

    let [storage, dead, analytics] = Layout::horizontal([
        Constraint::Percentage(34),
        Constraint::Percentage(33),
        Constraint::Percentage(33),
    ])
    .areas(bottom);
    frame.render_widget(
        Table::new(
            vec![
                row("spool", bytes(f.spool_bytes)),
                row("spool segments", format!("{:.0}", f.spool_segments)),
                row("writers stalled", format!("{:.0}", f.writers_stalled)),
            ],
            widths,
        )
        .block(pane("Storage")),
        storage,
    );
    let reasons: Vec<Row> = f
        .dead_letters
        .iter()
        .map(|(reason, n)| Row::new(vec![reason.clone(), format!("{n:.0}")]))
        .collect();
    frame.render_widget(
        Table::new(reasons, widths).block(pane("Dead letters")),
        dead,
    );
    frame.render_widget(
        Table::new(
            vec![
                row("series", format!("{:.0}", f.series)),
                row("memory", bytes(f.analytics_bytes)),
                row("alerts", format!("{:.0}", f.alerts_total)),
            ],
            widths,
        )
        .block(pane("Analytics")),
        analytics,
    );

    let rows: Vec<Row> = recent
        .iter()
        .map(|a| {
            let colour = if a.state == "raised" {
                Color::Red
            } else {
                Color::Green
            };
            Row::new(vec![
                a.time.clone(),
                a.state.clone(),
                a.device_id.clone(),
                a.metric.clone(),
                a.rule.clone(),
                a.value.map_or("-".into(), |v| format!("{v:.3}")),
            ])
            .style(Style::default().fg(colour))
        })
        .collect();
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(28),
                Constraint::Length(8),
                Constraint::Length(18),
                Constraint::Length(12),
                Constraint::Length(18),
                Constraint::Min(8),
            ],
        )
        .header(Row::new(vec![
            "time", "state", "device", "metric", "rule", "value",
        ]))
        .block(pane("Last alerts")),
        alerts_area,
    );
}
