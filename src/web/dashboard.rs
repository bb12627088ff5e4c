//! The live dashboard: a page at `/` of the telemetry listener and the small
//! JSON API behind it.
//!
//! - [`PacketStore`] keeps the most recent packets in memory, bounded by
//!   [`RECENT_PACKETS`], fed by the pipeline's packet hook with each packet
//!   exactly as it was published. The page therefore shows what `login-metrics`
//!   (the topic) shows: pseudonyms where `privacy.pseudonymize` applies, never
//!   a raw value that packets do not carry.
//! - [`Dashboard::status`] is a snapshot of the run: state, throughput,
//!   consumer lag, counts and the latest packet.
//! - [`Dashboard::router`] serves `/` (HTML), `/assets/*` (its script and
//!   style sheet), `/api/status` and `/api/packets?limit=N&after=SEQ&wait=S`.
//!   The page polls the status every two seconds and long-polls the packets
//!   (`wait`: the request is answered as soon as a packet newer than `after`
//!   is published), so a new packet shows at once without a reload and an
//!   idle page costs almost nothing. It draws its tables and SVG charts
//!   itself: no request leaves the machine, nothing is loaded from
//!   elsewhere, and the `Content-Security-Policy` header forbids it.
//!
//! Access: the page and `/api/*` show personal data (user ids, IP addresses,
//! device ids unless pseudonymized). With `telemetry.token` set they answer
//! 401 unless the request carries `Authorization: Bearer <token>` or
//! `?token=<token>`, compared in constant time ([`TokenCheck`]). Without a
//! token they answer 403 unless the request's `Host` is an IP address or a
//! name of `telemetry.allowed_hosts` ([`HostCheck`]): a page on another site
//! whose name an attacker points at 127.0.0.1 (DNS rebinding) sends its own
//! name as `Host` and is refused. The script and style sheet under
//! `/assets/` hold no data and stay open, as do `/metrics`, `/healthz` and
//! `/readyz` (served by [`crate::web::server`]).
//!
//! `/api/packets` answers with the stored packets' bytes as they are
//! ([`bytes::Bytes`] shared with the store), so a request for all of them
//! costs a list of handles, not a copy of the store.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio::sync::watch;

use crate::core::packet::Packet;
use crate::pipeline::Pipeline;
use crate::settings::{BatchMode, Settings};
use crate::telemetry::{Health, Progress};

/// Packets the store keeps: enough for the page's recent windows (the last 30
/// by default) and for a reader of `/api/packets` who polls now and then,
/// while bounding memory (a packet with 7 slices × 100 rows is ~70 KB).
pub const RECENT_PACKETS: usize = 200;

/// `/api/packets` without `limit`.
const DEFAULT_LIMIT: usize = 30;

/// The longest `wait` of `/api/packets`, in seconds.
pub const MAX_WAIT_SECONDS: u64 = 30;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

/// Only this origin: the page loads nothing from elsewhere and sends nothing
/// elsewhere, whatever a value in a packet might contain.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// The response header of `/api/packets` naming the sequence number of the
/// newest packet in the response, for the next request's `after`.
pub const SEQ_HEADER: &str = "x-packet-seq";

/// One packet as published, with its place in the sequence of this process.
#[derive(Debug, Clone)]
struct Stored {
    seq: u64,
    packet_id: String,
    emitted_at: String,
    closed_by: String,
    /// The packet's JSON as published (the output topic's record value).
    json: Bytes,
}

/// The most recent packets, newest last, at most `capacity` of them.
#[derive(Debug)]
pub struct PacketStore {
    capacity: usize,
    inner: Mutex<StoreInner>,
    /// The sequence number of the newest packet, for requests waiting for one.
    newest: watch::Sender<u64>,
    /// Requests waiting for the next packet now (open pages, mostly).
    waiting: AtomicUsize,
}

#[derive(Debug, Default)]
struct StoreInner {
    packets: VecDeque<Stored>,
    /// Packets ever stored; the sequence number of the newest.
    seq: u64,
}

/// An answer of [`PacketStore::recent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recent {
    /// The packets' JSON, newest first (shared with the store, not copied).
    pub packets: Vec<Bytes>,
    /// Sequence number of the newest packet stored (0: none yet). A client
    /// passes it as `after` next time to get only what is new.
    pub seq: u64,
}

/// The latest packet, as [`PacketStore::latest`] describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    pub seq: u64,
    pub packet_id: String,
    pub emitted_at: String,
    pub closed_by: String,
}

impl PacketStore {
    pub fn new(capacity: usize) -> PacketStore {
        PacketStore {
            capacity: capacity.max(1),
            inner: Mutex::default(),
            newest: watch::Sender::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Stores a packet as published, forgetting the oldest beyond capacity.
    pub fn push(&self, packet: &Packet) {
        let stored = Stored {
            seq: 0,
            packet_id: packet.packet_id.clone(),
            emitted_at: packet.emitted_at.clone(),
            closed_by: packet.window.closed_by.clone(),
            json: Bytes::from(packet.to_json()),
        };
        let mut inner = self.lock();
        inner.seq += 1;
        let seq = inner.seq;
        inner.packets.push_back(Stored { seq, ..stored });
        while inner.packets.len() > self.capacity {
            inner.packets.pop_front();
        }
        drop(inner);
        self.newest.send_replace(seq);
    }

    /// Waits until a packet newer than `after` is stored, or `timeout`
    /// passes; at once when `after` is not behind (a client that counted
    /// further than this store, from before a restart, must hear so now).
    pub async fn wait_newer(&self, after: u64, timeout: Duration) {
        let mut newest = self.newest.subscribe();
        if *newest.borrow_and_update() != after {
            return;
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        // Decremented however the wait ends, a client hanging up included.
        let _waiting = DecrementOnDrop(&self.waiting);
        let _ = tokio::time::timeout(timeout, newest.wait_for(|seq| *seq > after)).await;
    }

    /// Requests waiting in [`PacketStore::wait_newer`] now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Up to `limit` (at most the capacity) of the newest packets stored
    /// after sequence number `after`, newest first.
    pub fn recent(&self, limit: usize, after: u64) -> Recent {
        let inner = self.lock();
        let packets = inner
            .packets
            .iter()
            .rev()
            .take_while(|p| p.seq > after)
            .take(limit.min(self.capacity))
            .map(|p| p.json.clone())
            .collect();
        Recent {
            packets,
            seq: inner.seq,
        }
    }

    pub fn latest(&self) -> Option<Latest> {
        self.lock().packets.back().map(|p| Latest {
            seq: p.seq,
            packet_id: p.packet_id.clone(),
            emitted_at: p.emitted_at.clone(),
            closed_by: p.closed_by.clone(),
        })
    }

    /// Packets held now.
    pub fn len(&self) -> usize {
        self.lock().packets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Packets ever stored.
    pub fn seq(&self) -> u64 {
        self.lock().seq
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        // A panic elsewhere while holding the lock leaves a consistent deque
        // (every mutation is complete before the guard drops); keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The dashboard's access rule: open without a token; with one, a request
/// must present it. Tokens are compared as HMAC tags with `verify_slice`,
/// which takes the same time whatever the position of the first differing
/// byte and whatever the length of the guess.
#[derive(Clone)]
pub struct TokenCheck {
    /// HMAC of the configured token; `None` when no token is configured.
    expected: Option<Vec<u8>>,
}

/// Only separates this use of HMAC from others; the secret is the token.
const TOKEN_MAC_KEY: &[u8] = b"login-metrics dashboard token";

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCheck")
            .field("token_set", &self.expected.is_some())
            .finish()
    }
}

impl TokenCheck {
    /// `token` empty: everything is allowed.
    pub fn new(token: &str) -> TokenCheck {
        TokenCheck {
            expected: (!token.is_empty())
                .then(|| tag(token.as_bytes()).finalize().into_bytes().to_vec()),
        }
    }

    pub fn is_open(&self) -> bool {
        self.expected.is_none()
    }

    /// Whether a request with this `Authorization` header value and this
    /// query string may see the dashboard.
    pub fn allows(&self, authorization: Option<&[u8]>, query: Option<&str>) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let matches = |given: &[u8]| tag(given).verify_slice(expected).is_ok();
        let bearer = authorization.and_then(bearer_token);
        if bearer.is_some_and(matches) {
            return true;
        }
        query
            .and_then(|q| query_param(q, "token"))
            .is_some_and(|t| matches(t.as_bytes()))
    }
}

/// Which `Host` header values may see an open dashboard: IP addresses (a
/// rebinding attack needs a name of its own), requests without one (not
/// from a browser), and the configured names, compared without case and
/// port; `*` allows any.
#[derive(Debug, Clone)]
pub struct HostCheck {
    names: Vec<String>,
    any: bool,
}

impl HostCheck {
    pub fn new(names: &[String]) -> HostCheck {
        HostCheck {
            names: names
                .iter()
                .map(|n| n.trim().to_ascii_lowercase())
                .collect(),
            any: names.iter().any(|n| n.trim() == "*"),
        }
    }

    pub fn allows(&self, host: Option<&[u8]>) -> bool {
        let Some(host) = host else {
            return true;
        };
        if self.any {
            return true;
        }
        let Ok(host) = std::str::from_utf8(host) else {
            return false;
        };
        let host = host.trim().to_ascii_lowercase();
        // [v6]:port, [v6], v4:port, name:port, name
        let name = match host.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((inside, _)) => inside,
                None => return false,
            },
            None => host
                .rsplit_once(':')
                .map_or(host.as_str(), |(name, _)| name),
        };
        let name = name.trim_end_matches('.');
        name.parse::<std::net::IpAddr>().is_ok() || self.names.iter().any(|n| n == name)
    }
}

fn tag(value: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(TOKEN_MAC_KEY).expect("HMAC takes keys of any length");
    mac.update(value);
    mac
}

/// The token of an `Authorization: Bearer <token>` header value (the scheme
/// is case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let scheme = b"bearer ";
    if value.len() > scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        Some(value[scheme.len()..].trim_ascii())
    } else {
        None
    }
}

/// The percent-decoded value of the first `name=value` pair of a query string.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == name)
            .then(|| percent_decode(v))
            .flatten()
    })
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
/// `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = (bytes.next()? as char).to_digit(16)?;
                let lo = (bytes.next()? as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// Throughput from samples of the consumed-message counter, taken when the
/// status is asked for: the rate over the last [`RATE_WINDOW`] or, after a
/// quiet spell, since the previous request.
#[derive(Debug, Default)]
struct RateSampler {
    samples: VecDeque<(Instant, u64)>,
}

const RATE_WINDOW: Duration = Duration::from_secs(10);

impl RateSampler {
    /// Records `count` at `now`; returns (events per second, over how many seconds).
    fn sample(&mut self, now: Instant, count: u64) -> Option<(f64, f64)> {
        if self
            .samples
            .back()
            .is_none_or(|(t, _)| now.saturating_duration_since(*t) >= Duration::from_millis(200))
        {
            self.samples.push_back((now, count));
        }
        // Keep the newest sample older than the window, as the rate's start.
        while self.samples.len() > 2
            && now.saturating_duration_since(self.samples[1].0) >= RATE_WINDOW
        {
            self.samples.pop_front();
        }
        let (t0, c0) = *self.samples.front()?;
        let span = now.saturating_duration_since(t0).as_secs_f64();
        (span >= 0.5).then(|| (count.saturating_sub(c0) as f64 / span, span))
    }
}

/// What the dashboard needs of the configuration.
#[derive(Debug, Clone)]
struct View {
    mode: BatchMode,
    slices: Vec<Vec<&'static str>>,
    top: usize,
    pseudonymized: Vec<&'static str>,
    input_topic: String,
    output_topic: String,
    window: Duration,
    /// Consumer lag above which the run counts as catching up.
    catching_up_lag: i64,
}

/// The dashboard of one process: its packet store, the run it watches and
/// its access rule. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Dashboard {
    store: Arc<PacketStore>,
    progress: Arc<Progress>,
    health: Arc<Health>,
    rate: Arc<Mutex<RateSampler>>,
    access: TokenCheck,
    hosts: HostCheck,
    view: Arc<View>,
    started: Instant,
}

impl Dashboard {
    pub fn new(settings: &Settings) -> Dashboard {
        let s = settings;
        Dashboard {
            store: Arc::new(PacketStore::new(RECENT_PACKETS)),
            progress: Arc::default(),
            health: Arc::default(),
            rate: Arc::default(),
            access: TokenCheck::new(s.telemetry.token.expose()),
            hosts: HostCheck::new(&s.telemetry.allowed_hosts),
            view: Arc::new(View {
                mode: s.batch.mode,
                slices: s
                    .analysis
                    .slices
                    .iter()
                    .map(|sl| sl.iter().map(|f| f.name()).collect())
                    .collect(),
                top: s.analysis.top,
                pseudonymized: s.privacy.pseudonymize.iter().map(|f| f.name()).collect(),
                input_topic: s.kafka.input_topic.clone(),
                output_topic: s.kafka.output_topic.clone(),
                window: s.batch.max_span,
                // More than two packets' worth of events behind the head.
                catching_up_lag: (s.batch.max_events as i64).saturating_mul(2),
            }),
            started: Instant::now(),
        }
    }

    /// Makes `pipeline` report into this dashboard: its progress and health,
    /// and every packet it publishes, as published.
    pub fn watch(&self, pipeline: Pipeline) -> Pipeline {
        let store = self.store.clone();
        pipeline
            .sharing(self.progress.clone(), self.health.clone())
            .on_packet(move |p| store.push(p))
    }

    /// [`Dashboard::watch`] for an instance of a merged group
    /// (`scale.merge`): its progress and health, and every packet the group
    /// publishes, read from the output topic ([`crate::web::group`]) until
    /// `stop`.
    pub fn watch_group(
        &self,
        pipeline: Pipeline,
        kafka: &crate::kafka::KafkaSettings,
        stop: tokio_util::sync::CancellationToken,
    ) -> Pipeline {
        let (store, k) = (self.store.clone(), kafka.clone());
        std::thread::spawn(move || crate::web::group::follow(&k, store, RECENT_PACKETS, stop));
        pipeline.sharing(self.progress.clone(), self.health.clone())
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    pub fn store(&self) -> &PacketStore {
        &self.store
    }

    /// A warning for the start-up log when the page is reachable beyond this
    /// machine without a token (it shows personal data).
    pub fn exposure_warning(settings: &Settings) -> Option<String> {
        let addr = settings.telemetry.listen?;
        (settings.telemetry.token.is_empty() && !addr.ip().is_loopback()).then(|| {
            format!(
                "the dashboard on {addr} shows user ids, IP addresses and device ids (unless pseudonymized) to anyone who reaches it: set telemetry.token, listen on 127.0.0.1, or set privacy.pseudonymize"
            )
        })
    }

    /// The run's state as the page shows it.
    fn state(&self) -> (&'static str, &'static str) {
        let h = &self.health;
        if !h.is_alive() {
            if h.has_run() {
                ("stopped", "stopped: no longer consuming")
            } else {
                ("starting", "starting")
            }
        } else if !h.brokers_up() || h.assigned() == 0 {
            ("waiting_for_broker", "waiting for the broker")
        } else if self.progress.lag.load(Ordering::Relaxed) > self.view.catching_up_lag {
            ("catching_up", "catching up")
        } else {
            ("ready", "ready")
        }
    }

    /// The status snapshot served at `/api/status`.
    pub fn status(&self) -> serde_json::Value {
        let p = &self.progress;
        let messages = p.messages.load(Ordering::Relaxed);
        let rate = self
            .rate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample(Instant::now(), messages);
        let (state, state_text) = self.state();
        // A stopped run consumes nothing, whatever the samples say.
        let rate = if state == "stopped" {
            Some((0.0, f64::NAN))
        } else {
            rate
        };
        let latest = self.store.latest().map(|l| {
            json!({
                "seq": l.seq,
                "packet_id": l.packet_id,
                "emitted_at": l.emitted_at,
                "closed_by": l.closed_by,
            })
        });
        let v = &self.view;
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "now": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            "uptime_seconds": self.started.elapsed().as_secs_f64().round(),
            "state": state,
            "state_text": state_text,
            "mode": match v.mode { BatchMode::Window => "window", BatchMode::Arrival => "arrival" },
            "window_seconds": v.window.as_secs_f64(),
            "input_topic": v.input_topic,
            "output_topic": v.output_topic,
            "slices": v.slices,
            "top": v.top,
            "pseudonymized": v.pseudonymized,
            "events": messages,
            "invalid": p.invalid.load(Ordering::Relaxed),
            "late": p.late.load(Ordering::Relaxed),
            "events_per_second": rate.map(|(r, _)| r.round()),
            "rate_seconds": rate.and_then(|(_, s)| s.is_finite().then(|| s.round())),
            "consumer_lag": p.lag.load(Ordering::Relaxed),
            "assigned_partitions": self.health.assigned(),
            "packets": p.packets.load(Ordering::Relaxed),
            "packets_seq": self.store.seq(),
            "packets_kept": self.store.len(),
            "packets_capacity": RECENT_PACKETS,
            "latest_packet": latest,
            "waiting_requests": self.store.waiting(),
        })
    }

    /// The dashboard's routes, to merge onto the telemetry listener.
    pub fn router(&self) -> Router {
        let guarded = Router::new()
            .route("/", get(index))
            .route("/api/status", get(api_status))
            .route("/api/packets", get(api_packets))
            .route_layer(middleware::from_fn_with_state(
                Access {
                    token: self.access.clone(),
                    hosts: self.hosts.clone(),
                },
                require_access,
            ));
        Router::new()
            .route("/assets/dashboard.js", get(script))
            .route("/assets/dashboard.css", get(style))
            .merge(guarded)
            .with_state(self.clone())
    }
}

/// The dashboard's access rule: a token when one is set, else a known `Host`.
#[derive(Clone)]
struct Access {
    token: TokenCheck,
    hosts: HostCheck,
}

/// Lets a request through when [`TokenCheck::allows`] it (401 otherwise) and,
/// without a token, when [`HostCheck::allows`] its `Host` (403 otherwise).
async fn require_access(State(access): State<Access>, request: Request, next: Next) -> Response {
    if access.token.is_open() {
        let host = request
            .headers()
            .get(header::HOST)
            .map(HeaderValue::as_bytes);
        if !access.hosts.allows(host) {
            return (
                StatusCode::FORBIDDEN,
                [
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                "403 forbidden: this Host is not in telemetry.allowed_hosts (add the name you use, or set telemetry.token)\n",
            )
                .into_response();
        }
        return next.run(request).await;
    }
    let auth = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if access.token.allows(auth, request.uri().query()) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE, "Bearer realm=\"login-metrics\""),
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        "401 unauthorized: the dashboard needs telemetry.token, as \"Authorization: Bearer TOKEN\" or ?token=TOKEN\n",
    )
        .into_response()
}

/// Headers of every dashboard response: nothing from elsewhere, no referrer
/// (a `?token=` in the address must not travel), no sniffing, no framing.
fn page_headers(
    content_type: &'static str,
    cache: &'static str,
) -> [(HeaderName, &'static str); 5] {
    [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, cache),
    ]
}

async fn index() -> Response {
    (
        page_headers("text/html; charset=utf-8", "no-store"),
        INDEX_HTML,
    )
        .into_response()
}

async fn script() -> Response {
    (
        page_headers("text/javascript; charset=utf-8", "no-cache"),
        SCRIPT,
    )
        .into_response()
}

async fn style() -> Response {
    (page_headers("text/css; charset=utf-8", "no-cache"), STYLE).into_response()
}

fn json_response(body: String) -> ([(HeaderName, &'static str); 5], String) {
    (page_headers("application/json", "no-store"), body)
}

async fn api_status(State(d): State<Dashboard>) -> Response {
    json_response(d.status().to_string()).into_response()
}

/// `/api/packets?limit=N&after=SEQ&wait=S`: the newest packets, as published,
/// newest first, as a JSON array; `limit` defaults to 30 and is capped at
/// [`RECENT_PACKETS`]; `after` keeps only packets newer than that sequence
/// number; `wait` (seconds, at most [`MAX_WAIT_SECONDS`]) holds the answer
/// until there is such a packet, or the time is up (an empty array). The
/// `x-packet-seq` header names the newest stored.
async fn api_packets(State(d): State<Dashboard>, request: Request) -> Response {
    let query = request.uri().query().unwrap_or("");
    let number = |name: &str, default: u64| -> Result<u64, String> {
        match query_param(query, name) {
            None => Ok(default),
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| format!("{name}: `{v}` is not a non-negative integer\n")),
        }
    };
    let (limit, after, wait) = match (
        number("limit", DEFAULT_LIMIT as u64),
        number("after", 0),
        number("wait", 0),
    ) {
        (Ok(l), Ok(a), Ok(w)) => (l, a, w.min(MAX_WAIT_SECONDS)),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return (StatusCode::BAD_REQUEST, e).into_response()
        }
    };
    if wait > 0 {
        d.store.wait_newer(after, Duration::from_secs(wait)).await;
    }
    let recent = d
        .store
        .recent(usize::try_from(limit).unwrap_or(usize::MAX), after);
    let seq = recent.seq;
    let body = axum::body::Body::new(JsonArray::new(recent.packets));
    let mut response = (page_headers("application/json", "no-store"), body).into_response();
    response
        .headers_mut()
        .insert(HeaderName::from_static(SEQ_HEADER), HeaderValue::from(seq));
    response
}

/// A JSON array sent element by element from shared buffers: `[`, each
/// packet, separated by `,`, then `]`. A separator is a chunk of its own, so
/// a packet's bytes are never copied.
struct JsonArray {
    items: std::vec::IntoIter<Bytes>,
    opened: bool,
    comma: bool,
    closed: bool,
    remaining: u64,
}

impl JsonArray {
    fn new(items: Vec<Bytes>) -> JsonArray {
        let commas = items.len().saturating_sub(1) as u64;
        let remaining = 2 + commas + items.iter().map(|b| b.len() as u64).sum::<u64>();
        JsonArray {
            items: items.into_iter(),
            opened: false,
            comma: false,
            closed: false,
            remaining,
        }
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.opened {
            self.opened = true;
            return Some(Bytes::from_static(b"["));
        }
        if self.closed {
            return None;
        }
        if self.comma && self.items.len() > 0 {
            self.comma = false;
            return Some(Bytes::from_static(b","));
        }
        match self.items.next() {
            Some(item) => {
                self.comma = true;
                Some(item)
            }
            None => {
                self.closed = true;
                Some(Bytes::from_static(b"]"))
            }
        }
    }
}

impl http_body::Body for JsonArray {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let chunk = self.next_chunk();
        if let Some(c) = &chunk {
            self.remaining -= c.len() as u64;
        }
        Poll::Ready(chunk.map(|c| Ok(http_body::Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.closed
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

struct DecrementOnDrop<'a>(&'a AtomicUsize);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::packet::{EventCounts, Window};

    fn packet(id: &str) -> Packet {
        Packet {
            schema_version: crate::core::packet::SCHEMA_VERSION,
            packet_id: id.to_string(),
            window: Window {
                start: None,
                end: None,
                pane: None,
                ts_min: None,
                ts_max: None,
                closed_by: "count".into(),
            },
            events: EventCounts {
                valid: 0,
                invalid: 0,
                invalid_by_kind: Default::default(),
                late: None,
            },
            sources: vec![],
            metrics: vec![],
            emitted_at: "2026-11-21T07:52:01.401Z".into(),
        }
    }

    fn ids(r: &Recent) -> Vec<String> {
        r.packets
            .iter()
            .map(|j| serde_json::from_slice::<Packet>(j).unwrap().packet_id)
            .collect()
    }

    fn drain(mut body: JsonArray) -> (Vec<u8>, u64) {
        let declared = http_body::Body::size_hint(&body).exact().unwrap();
        let mut out = Vec::new();
        while let Some(chunk) = body.next_chunk() {
            out.extend_from_slice(&chunk);
        }
        (out, declared)
    }

    #[test]
    fn packets_are_sent_as_a_json_array_of_the_stored_bytes() {
        for items in [
            vec![],
            vec!["{\"a\":1}"],
            vec!["{\"a\":1}", "{}", "{\"b\":[2]}"],
        ] {
            let stored: Vec<Bytes> = items.iter().map(|i| Bytes::from(i.to_string())).collect();
            let (out, declared) = drain(JsonArray::new(stored.clone()));
            assert_eq!(
                String::from_utf8(out.clone()).unwrap(),
                format!("[{}]", items.join(","))
            );
            assert_eq!(declared, out.len() as u64);
            // Shared, not copied: the chunks point into the stored buffers.
            let mut body = JsonArray::new(stored.clone());
            let chunks: Vec<Bytes> = std::iter::from_fn(|| body.next_chunk()).collect();
            for s in &stored {
                assert!(chunks.iter().any(|c| c.as_ptr() == s.as_ptr()));
            }
        }
    }

    #[test]
    fn an_open_dashboard_answers_ip_addresses_and_the_allowed_names_only() {
        let check = HostCheck::new(&["localhost".into(), "Metrics.Example".into()]);
        for allowed in [
            "localhost:9464",
            "LOCALHOST",
            "localhost.",
            "127.0.0.1:9464",
            "10.0.0.7",
            "[::1]:9464",
            "[::1]",
            "metrics.example:80",
        ] {
            assert!(check.allows(Some(allowed.as_bytes())), "{allowed}");
        }
        for refused in [
            "attacker.example:9464",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "[::1",
            "",
        ] {
            assert!(!check.allows(Some(refused.as_bytes())), "{refused}");
        }
        assert!(check.allows(None), "no Host: not a browser");
        assert!(HostCheck::new(&["*".into()]).allows(Some(b"anything.example")));
    }

    #[test]
    fn the_store_keeps_the_newest_packets_up_to_its_capacity() {
        let store = PacketStore::new(3);
        assert!(store.is_empty());
        assert_eq!(
            store.recent(10, 0),
            Recent {
                packets: vec![],
                seq: 0
            }
        );
        for i in 1..=5 {
            store.push(&packet(&format!("p{i}")));
        }
        assert_eq!(store.len(), 3, "bounded");
        assert_eq!(store.seq(), 5, "every packet counted");
        let all = store.recent(100, 0);
        assert_eq!(
            ids(&all),
            ["p5", "p4", "p3"],
            "newest first, oldest forgotten"
        );
        assert_eq!(all.seq, 5);
        assert_eq!(ids(&store.recent(2, 0)), ["p5", "p4"], "limit");
        assert_eq!(
            ids(&store.recent(100, 3)),
            ["p5", "p4"],
            "after a sequence number"
        );
        assert!(store.recent(100, 5).packets.is_empty(), "nothing new");
        let latest = store.latest().unwrap();
        assert_eq!((latest.seq, latest.packet_id.as_str()), (5, "p5"));
    }

    #[test]
    fn the_store_holds_each_packet_exactly_as_published() {
        let store = PacketStore::new(RECENT_PACKETS);
        let p = packet("abc");
        store.push(&p);
        assert_eq!(&*store.recent(1, 0).packets[0], p.to_json().as_bytes());
    }

    #[tokio::test]
    async fn a_waiting_request_is_answered_by_the_next_packet() {
        let store = Arc::new(PacketStore::new(4));
        store.push(&packet("a"));
        // Not behind: at once.
        store.wait_newer(0, Duration::from_secs(3600)).await;
        store.wait_newer(7, Duration::from_secs(3600)).await;
        // Up to date: until the next packet.
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait_newer(1, Duration::from_secs(3600)).await })
        };
        tokio::task::yield_now().await;
        store.push(&packet("b"));
        tokio::time::timeout(Duration::from_secs(60), waiter)
            .await
            .expect("the waiting request is answered")
            .unwrap();
        // Nothing comes: until the time is up.
        store.wait_newer(2, Duration::from_millis(10)).await;
    }

    #[test]
    fn a_limit_is_capped_at_the_capacity() {
        let store = PacketStore::new(4);
        for i in 0..10 {
            store.push(&packet(&i.to_string()));
        }
        assert_eq!(store.recent(usize::MAX, 0).packets.len(), 4);
    }

    #[test]
    fn without_a_token_everything_is_allowed() {
        let open = TokenCheck::new("");
        assert!(open.is_open());
        assert!(open.allows(None, None));
        assert!(open.allows(Some(b"Bearer whatever"), Some("token=x")));
    }

    #[test]
    fn a_token_is_required_in_the_header_or_the_query() {
        let check = TokenCheck::new("s3cret-Tok");
        assert!(!check.is_open());
        assert!(!check.allows(None, None));
        assert!(check.allows(Some(b"Bearer s3cret-Tok"), None));
        assert!(
            check.allows(Some(b"bearer s3cret-Tok"), None),
            "scheme is case-insensitive"
        );
        assert!(check.allows(None, Some("token=s3cret-Tok")));
        assert!(
            check.allows(None, Some("limit=5&token=s3cret%2DTok")),
            "percent-decoded"
        );
        assert!(check.allows(Some(b"Bearer wrong"), Some("token=s3cret-Tok")));
        for wrong in [
            "s3cret-to",
            "s3cret-Tok ",
            "s3cret-Toka",
            "S3CRET-TOK",
            "",
            "s3cret-Tok\0",
        ] {
            let header = format!("Bearer {wrong}");
            assert!(
                !check.allows(Some(header.as_bytes()), None) || wrong.trim() == "s3cret-Tok",
                "header {wrong:?}"
            );
            let query = format!("token={wrong}");
            assert!(!check.allows(None, Some(&query)), "query {wrong:?}");
        }
        assert!(
            !check.allows(Some(b"Basic s3cret-Tok"), None),
            "only bearer"
        );
        assert!(!check.allows(Some(b"s3cret-Tok"), None));
        assert!(!check.allows(None, Some("tokens=s3cret-Tok")));
        assert!(!check.allows(None, Some("token=%zz")), "malformed escape");
    }

    #[test]
    fn query_parameters_are_decoded() {
        assert_eq!(query_param("a=1&b=x+y%21", "b").as_deref(), Some("x y!"));
        assert_eq!(query_param("a=1&a=2", "a").as_deref(), Some("1"));
        assert_eq!(query_param("flag&a=1", "flag").as_deref(), Some(""));
        assert_eq!(query_param("a=1", "b"), None);
        assert_eq!(query_param("a=%e2%82%ac", "a").as_deref(), Some("€"));
        assert_eq!(query_param("a=%ff", "a"), None, "not UTF-8");
    }

    #[test]
    fn the_rate_is_measured_over_recent_samples() {
        let mut r = RateSampler::default();
        let t0 = Instant::now();
        assert_eq!(r.sample(t0, 0), None, "one sample is no rate");
        let (rate, span) = r.sample(t0 + Duration::from_secs(2), 2_000).unwrap();
        assert_eq!((rate, span), (1_000.0, 2.0));
        for s in 3..=30 {
            r.sample(t0 + Duration::from_secs(s), 2_000 + (s - 2) * 10);
        }
        let (rate, span) = r.sample(t0 + Duration::from_secs(31), 2_290).unwrap();
        assert!(span <= 11.0, "the window moves: {span}");
        assert!((rate - 10.0).abs() < 0.01, "{rate}");
    }
}
