//! The dashboard as a person sees it: the real binary against a real
//! broker (Apache Kafka), its page loaded by headless Chromium, which
//! runs the page's script against the page's API. The DOM Chromium rendered
//! must show every configured slice and the top combinations of the latest
//! packet, as published, with their counts; a newer packet must replace them
//! in the same page, without a reload. With `telemetry.token`, the page and its API need the
//! token (and the page opened with `?token=` passes it on); `/metrics`,
//! `/healthz` and `/readyz` stay open.
//!
//! No assertion on elapsed time: every wait polls for a condition under a
//! generous deadline.

use std::time::{Duration, Instant};

use crate::common::broker::Broker;
use crate::common::browser::dump_dom;
use crate::common::service::{service_env, Service};
use crate::common::*;
use login_metrics::core::packet::Packet;
use login_metrics::core::privacy::Pseudonymizer;
use serde_json::Value;

const READY: Duration = Duration::from_secs(60);
const DONE: Duration = Duration::from_secs(120);
const TOKEN: &str = "dash-Token_4f9c2e";
/// Virtual time a page runs before its DOM is taken, for a page as loaded:
/// the initial requests (virtual time stands still while a request is
/// open) and rendering, but not the next packet request (after 1 s).
const LOADED: Duration = Duration::from_millis(900);
/// For a page that must wait for the next packet: past its first long-polled
/// request, which holds the virtual clock until the packet comes.
const LIVE: Duration = Duration::from_millis(1500);

/// Window mode (the default), windows closed a few seconds after their first
/// event so packets come quickly, on one input partition.
fn start_service(
    b: &Broker,
    dir: &std::path::Path,
    group: &str,
    extra: &[(&str, &str)],
) -> Service {
    let mut env = service_env(&b.bootstrap, group);
    for (k, v) in [("BATCH__MODE", "window"), ("BATCH__MAX_WAIT", "3s")]
        .iter()
        .chain(extra)
    {
        env.push((format!("LOGIN_METRICS__{k}"), v.to_string()));
    }
    let svc = Service::start(dir, group, &env);
    svc.wait_ready(READY);
    svc
}

async fn broker() -> Broker {
    let b = Broker::start();
    b.create_topic(INPUT, 1).await;
    b.create_topic(OUTPUT, 1).await;
    b.create_topic(DLQ, 1).await;
    b
}

/// A phase of input in one ten-second window starting `minutes_ago` minutes
/// ago: `heavy` logs in `heavy_n` times from one IP and one device, `second`
/// `second_n` times, plus 20 one-off users and two malformed messages.
fn phase(tag: &str, minutes_ago: i64, heavy_n: usize, second_n: usize) -> Vec<Input> {
    let now = chrono::Utc::now().timestamp_millis();
    let start = (now - minutes_ago * 60_000) / 10_000 * 10_000;
    let mut out = Vec::new();
    let mut ts = start + 500;
    let mut event = |user: String, ip: String, device: String, version: &str| {
        ts += 37;
        input(
            0,
            event_json(
                &[
                    ("user_id", Some(&user)),
                    ("ip", Some(&ip)),
                    ("device_id", Some(&device)),
                    ("app_version", Some(version)),
                    ("device_type", Some("android")),
                    ("locale", Some("NL")),
                ],
                Value::from(ts),
            ),
        )
    };
    let version = format!("{tag}.0");
    for _ in 0..heavy_n {
        out.push(event(
            format!("u-{tag}-heavy"),
            format!("198.51.100.{}", heavy_n),
            format!("dev-{tag}-h"),
            &version,
        ));
    }
    for _ in 0..second_n {
        out.push(event(
            format!("u-{tag}-second"),
            format!("203.0.113.{}", second_n),
            format!("dev-{tag}-s"),
            &version,
        ));
    }
    for i in 0..20 {
        out.push(event(
            format!("u-{tag}-once-{i}"),
            format!("192.0.2.{}", 100 + i),
            format!("dev-{tag}-{i}"),
            "0.9.0",
        ));
    }
    out.push(input(0, "not json at all"));
    out.push(input(0, "[1, 2, 3]"));
    out
}

/// Produces `messages`, waits until every one is in a delivered, committed
/// packet, then until the page's API reports the newest of them; returns it.
fn publish(
    b: &Broker,
    svc: &Service,
    group: &str,
    messages: &[Input],
    end: &mut i64,
    auth: &[(&str, &str)],
) -> Packet {
    produce(&b.bootstrap, INPUT, messages);
    *end += messages.len() as i64;
    wait_committed(&b.bootstrap, group, &[*end], DONE);
    let latest = svc
        .logged_packets()
        .pop()
        .expect("a packet in the metrics log");
    let deadline = Instant::now() + DONE;
    loop {
        let (status, body) = get(svc, "/api/status", auth);
        assert_eq!(status, 200, "{body}");
        let s: Value = serde_json::from_str(&body).expect("status JSON");
        if s["latest_packet"]["packet_id"] == latest.packet_id.as_str() {
            return latest;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard never reported packet {}: {s}",
            latest.packet_id
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until a page is waiting for the next packet.
fn wait_for_a_waiting_page(svc: &Service) {
    let deadline = Instant::now() + DONE;
    loop {
        let (_, body) = get(svc, "/api/status", &[]);
        let s: Value = serde_json::from_str(&body).expect("status JSON");
        if s["waiting_requests"].as_u64() >= Some(1) {
            return;
        }
        assert!(Instant::now() < deadline, "no page waits for packets: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTP/1.0 GET with extra headers; (status, body).
fn get(svc: &Service, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", svc.metrics_port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    s.write_all(request.as_bytes()).expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Loads the page in Chromium until it has rendered packet `id` (the page
/// marks the body with the packet it shows); returns the DOM.
fn page_showing(svc: &Service, query: &str, id: &str) -> String {
    let url = format!("http://127.0.0.1:{}/{query}", svc.metrics_port);
    let marker = format!("data-packet-id=\"{id}\"");
    let deadline = Instant::now() + DONE;
    loop {
        let dom = dump_dom(&url, LOADED);
        if dom.contains(&marker) {
            return dom;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed packet {id}; last DOM:\n{dom}"
        );
    }
}

/// The HTML of the section of slice `key` (`user_id+ip`).
fn section<'a>(dom: &'a str, key: &str) -> &'a str {
    let start = dom
        .find(&format!("data-slice=\"{key}\""))
        .unwrap_or_else(|| panic!("no section for slice {key} in the page:\n{dom}"));
    let rest = &dom[start..];
    let end = rest[1..].find("<section").map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

/// The rows of a section's table of class `top <class>`, as cell texts.
fn rows(section: &str, class: &str) -> Vec<Vec<String>> {
    let start = section
        .find(&format!("class=\"top {class}\""))
        .unwrap_or_else(|| panic!("no {class} table in:\n{section}"));
    let table = &section[start..];
    let table = &table[..table.find("</table>").expect("a closed table")];
    let body = &table[table.find("<tbody").expect("a table body")..];
    body.split("<tr")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let text = &cell[cell.find('>').expect("a cell") + 1..];
                    decode(&text[..text.find("</td>").expect("a closed cell")])
                })
                .collect()
        })
        .collect()
}

fn decode(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

/// A count as the page prints it (en-US grouping).
fn count_text(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The rows the page shows for a slice of `p`: its first ten duplicates,
/// values (null as "(null)") then the count.
fn expected_rows(p: &Packet, slice: usize) -> Vec<Vec<String>> {
    let m = &p.metrics[slice];
    m.duplicates
        .iter()
        .take(10)
        .map(|row| {
            let mut cells: Vec<String> = m
                .slice
                .iter()
                .map(|f| match &row[f] {
                    Value::String(s) => s.clone(),
                    _ => "(null)".to_string(),
                })
                .collect();
            cells.push(count_text(row["count"].as_u64().unwrap()));
            cells
        })
        .collect()
}

/// Every configured slice has its section and heading, and each shows the
/// latest packet's top rows with their counts in its "latest" table.
fn assert_shows(dom: &str, latest: &Packet) {
    let slices = default_slices();
    assert_eq!(latest.metrics.len(), slices.len());
    for (i, slice) in slices.iter().enumerate() {
        let key = slice.join("+");
        let sec = section(dom, &key);
        assert!(
            sec.contains(&format!("<h2>{}</h2>", slice.join(" + "))),
            "slice {key} is named on the page:\n{sec}"
        );
        let expected = expected_rows(latest, i);
        let shown = rows(sec, "latest");
        if expected.is_empty() {
            assert_eq!(shown, vec![vec!["none repeated".to_string()]], "{key}");
        } else {
            assert_eq!(shown, expected, "latest rows of {key}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_latest_packet_and_follows_newer_ones() {
    let b = broker().await;
    let dir = tempfile::tempdir().unwrap();
    let svc = start_service(&b, dir.path(), "dash", &[]);
    let mut end = 0;

    let first = publish(&b, &svc, "dash", &phase("1", 10, 7, 4), &mut end, &[]);
    let dom = page_showing(&svc, "", &first.packet_id);
    assert_shows(&dom, &first);
    // The combination a person looks for, by hand: the user who logged in
    // seven times from one IP.
    let user_ip = rows(section(&dom, "user_id+ip"), "latest");
    assert_eq!(
        user_ip[0],
        ["u-1-heavy", "198.51.100.7", "7"],
        "the top user_id + ip row"
    );
    assert!(dom.contains("data-ready=\"1\""));

    // Live: in one page load, a newer packet replaces the latest rows. The
    // page has rendered the latest packet once it waits for the next one
    // (`waiting_requests`); only then is newer input produced. Should the
    // page's wait end before the packet comes (a very slow machine), the
    // page is loaded again for another newer packet.
    let url = format!("http://127.0.0.1:{}/", svc.metrics_port);
    let deadline = Instant::now() + DONE * 2;
    let mut k = 2;
    let (second, dom) = loop {
        let page = {
            let url = url.clone();
            std::thread::spawn(move || dump_dom(&url, LIVE))
        };
        wait_for_a_waiting_page(&svc);
        let tag = k.to_string();
        let next = publish(
            &b,
            &svc,
            "dash",
            &phase(&tag, 10 - k, 7 + k as usize, 3),
            &mut end,
            &[],
        );
        let dom = page.join().expect("the browser thread");
        if dom.contains(&format!("data-packet-id=\"{}\"", next.packet_id)) {
            assert!(
                dom.contains("data-updates=\"2\""),
                "the page loaded one packet, then received the newer one:\n{dom}"
            );
            break (next, dom);
        }
        assert!(
            Instant::now() < deadline && k < 8,
            "the open page never showed the newer packet {}:\n{dom}",
            next.packet_id
        );
        eprintln!(
            "the page stopped waiting before packet {} came; again",
            next.packet_id
        );
        k += 1;
    };
    assert_ne!(second.packet_id, first.packet_id);
    assert_shows(&dom, &second);
    let heavy = [
        format!("u-{k}-heavy"),
        format!("198.51.100.{}", 7 + k),
        (7 + k).to_string(),
    ];
    let user_ip = section(&dom, "user_id+ip");
    let latest = rows(user_ip, "latest");
    assert_eq!(latest[0], heavy);
    assert!(
        latest.iter().all(|r| !r[0].starts_with("u-1-")),
        "the first phase is not in the latest table: {latest:?}"
    );
    // The recent packets taken together hold both phases.
    let recent = rows(user_ip, "recent");
    for who in [
        [heavy[0].as_str(), &heavy[1], "1", &heavy[2]],
        ["u-1-heavy", "198.51.100.7", "1", "7"],
    ] {
        assert!(recent.iter().any(|r| r == &who), "{who:?} in {recent:?}");
    }
    // And a page loaded now shows the same.
    assert_shows(&page_showing(&svc, "", &second.packet_id), &second);

    // The API behind it: the packets as published, newest first.
    let (status, body) = get(&svc, "/api/packets?limit=2", &[]);
    assert_eq!(status, 200);
    let api: Vec<Packet> = serde_json::from_str(&body).expect("packets JSON");
    let logged = svc.logged_packets();
    let newest_two: Vec<Packet> = logged.iter().rev().take(2).cloned().collect();
    assert_eq!(api, newest_two, "as published, newest first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_and_its_api_need_it_and_telemetry_stays_open() {
    let b = broker().await;
    let dir = tempfile::tempdir().unwrap();
    // IPs pseudonymized: the page shows the pseudonyms packets carry, never
    // the raw values.
    let key = "dashboard-test-key";
    let svc = start_service(
        &b,
        dir.path(),
        "dash-token",
        &[
            ("TELEMETRY__TOKEN", TOKEN),
            ("PRIVACY__PSEUDONYMIZE", "ip"),
            ("PRIVACY__KEY", key),
        ],
    );
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];

    for path in ["/", "/api/status", "/api/packets"] {
        assert_eq!(get(&svc, path, &[]).0, 401, "{path} without the token");
        assert_eq!(
            get(&svc, path, &[("Authorization", "Bearer not-the-token")]).0,
            401,
            "{path} with a wrong token"
        );
        assert_eq!(
            get(&svc, &format!("{path}?token=not-the-token"), &[]).0,
            401,
            "{path}?token= wrong"
        );
        assert_eq!(
            get(&svc, path, &auth).0,
            200,
            "{path} with the bearer token"
        );
        assert_eq!(
            get(&svc, &format!("{path}?token={TOKEN}"), &[]).0,
            200,
            "{path}?token="
        );
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(get(&svc, path, &[]).0, 200, "{path} stays open");
    }

    let mut end = 0;
    let first = publish(
        &b,
        &svc,
        "dash-token",
        &phase("1", 10, 6, 3),
        &mut end,
        &auth,
    );
    // Opened with ?token=, the page's own API calls carry it.
    let dom = page_showing(&svc, &format!("?token={TOKEN}"), &first.packet_id);
    assert_shows(&dom, &first);
    let pseudonym = Pseudonymizer::new(key.as_bytes(), &[]).pseudonym("198.51.100.6");
    assert_eq!(
        rows(section(&dom, "user_id+ip"), "latest")[0],
        ["u-1-heavy", pseudonym.as_str(), "6"],
        "the top user_id + ip row, pseudonymized"
    );
    let (_, api) = get(&svc, "/api/packets", &auth);
    for raw in ["198.51.100.", "203.0.113.", "192.0.2."] {
        assert!(!dom.contains(raw), "a raw IP ({raw}…) on the page");
        assert!(!api.contains(raw), "a raw IP ({raw}…) in /api/packets");
    }
    // Without it, Chromium gets the 401 and no data.
    let denied = dump_dom(&format!("http://127.0.0.1:{}/", svc.metrics_port), LOADED);
    assert!(!denied.contains("u-1-heavy"), "{denied}");
    assert!(!denied.contains("data-packet-id"), "{denied}");
    assert!(!svc.stderr().contains(TOKEN), "the token is never logged");
}
