//! Apache Kafka for the tests: a single-node KRaft broker (broker and
//! controller in one JVM) in a separate process on free loopback ports, with
//! a fresh log directory, started by `scripts/kafka-broker` from the jars
//! `scripts/install-kafka` fetches (it installs them when they are missing).
//! A broker that cannot start fails the test with its log; nothing is
//! skipped.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// How long a broker may take to serve: a JVM start and a storage format,
/// on a machine busy with the other tests.
const START_WITHIN: Duration = Duration::from_secs(120);

pub struct Broker {
    child: Child,
    /// The PLAINTEXT listener.
    pub bootstrap: String,
    /// The SASL_SSL listener, when the broker was started with one.
    pub secured: Option<Secured>,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// A SASL_SSL listener with SCRAM-SHA-512 (and SCRAM-SHA-256, PLAIN) for one
/// user, and the CA that signed the broker's certificate.
pub struct Secured {
    pub bootstrap: String,
    pub ca: PathBuf,
    pub user: String,
    pub password: String,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

impl Broker {
    /// A broker with a PLAINTEXT listener only.
    pub fn start() -> Broker {
        Self::launch(false)
    }

    /// A broker with a SASL_SSL listener too, its certificates made by
    /// `scripts/kafka-certs` for this broker alone.
    pub fn start_secured() -> Broker {
        Self::launch(true)
    }

    fn launch(secured: bool) -> Broker {
        let dir = tempfile::tempdir().expect("broker dir");
        let log = dir.path().join("broker.log");
        let (port, cport) = (free_port(), free_port());
        let mut cmd = Command::new(root().join("scripts/kafka-broker"));
        cmd.arg("--dir")
            .arg(dir.path().join("kafka"))
            .args(["--port", &port.to_string()])
            .args(["--controller-port", &cport.to_string()])
            .args(["--heap", "384m"]);
        let secured = secured.then(|| {
            let certs = dir.path().join("certs");
            let made = Command::new(root().join("scripts/kafka-certs"))
                .arg(&certs)
                .stdout(Stdio::null())
                .status()
                .expect("scripts/kafka-certs runs");
            assert!(made.success(), "scripts/kafka-certs failed");
            let s = Secured {
                bootstrap: format!("127.0.0.1:{}", free_port()),
                ca: certs.join("ca.pem"),
                user: "login-metrics".into(),
                password: "s3cret-pass".into(),
            };
            cmd.args(["--sasl-ssl-port", s.bootstrap.rsplit(':').next().unwrap()])
                .arg("--certs")
                .arg(&certs)
                .args(["--scram-user", &s.user, "--scram-password", &s.password]);
            s
        });
        // Its own process group, so that a failed start kills the format
        // step's JVM too.
        let child = cmd
            .process_group(0)
            .stdout(std::fs::File::create(&log).expect("broker log"))
            .stderr(Stdio::from(
                std::fs::File::options().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .expect("scripts/kafka-broker starts");
        let mut broker = Broker {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
            secured,
            log,
            _dir: dir,
        };
        broker.wait_serving();
        broker
    }

    /// Waits until the broker answers a metadata request.
    fn wait_serving(&mut self) {
        let started = Instant::now();
        while TcpStream::connect(&self.bootstrap).is_err() {
            self.assert_starting(started);
            std::thread::sleep(Duration::from_millis(100));
        }
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("probe client");
        while probe
            .fetch_metadata(None, Duration::from_secs(2))
            .map_or(true, |md| md.brokers().is_empty())
        {
            self.assert_starting(started);
        }
        eprintln!(
            "Apache Kafka serving on {} after {:.1}s",
            self.bootstrap,
            started.elapsed().as_secs_f64()
        );
    }

    fn assert_starting(&mut self, started: Instant) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "Apache Kafka exited ({status}) before it served; its log:\n{}",
                self.log_tail()
            );
        }
        assert!(
            started.elapsed() < START_WITHIN,
            "Apache Kafka did not serve on {} in {START_WITHIN:?}; its log:\n{}",
            self.bootstrap,
            self.log_tail()
        );
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[]).await
    }

    /// A topic with topic-level settings (`max.message.bytes`, say).
    pub async fn create_topic_with(&self, name: &str, partitions: i32, config: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("admin client");
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in config {
            topic = topic.set(k, v);
        }
        let results = admin
            .create_topics(
                &[topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await
            .expect("create topics");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("cannot create {t}: {e}"));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // The whole group: the JVM, and a format step still running.
        unsafe {
            libc::killpg(self.child.id() as i32, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}
