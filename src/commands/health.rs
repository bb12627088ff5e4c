//! `health`: exit 0 when the service's `/healthz` answers (container health
//! checks need no curl).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;

use crate::web::server;

pub fn run(url: &str) -> ExitCode {
    match server::check_health(url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("login-metrics: unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `/healthz` URL of the listener `telemetry.listen` binds. A wildcard
/// address (`0.0.0.0`, `[::]`, as in containers) is asked on loopback, which
/// it includes.
pub fn url_of(listen: Option<SocketAddr>) -> Result<String, String> {
    let Some(mut addr) = listen else {
        return Err("telemetry.listen is empty (the HTTP listener is disabled): there is no /healthz to ask; set it or pass --url".into());
    };
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        _ => {}
    }
    Ok(format!("http://{addr}/healthz"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_follows_the_listener_and_asks_a_wildcard_on_loopback() {
        let url = |s: &str| url_of(Some(s.parse().unwrap())).unwrap();
        assert_eq!(url("127.0.0.1:9464"), "http://127.0.0.1:9464/healthz");
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080/healthz");
        assert_eq!(url("[::]:9000"), "http://[::1]:9000/healthz");
        assert_eq!(url("10.1.2.3:9464"), "http://10.1.2.3:9464/healthz");
        assert!(url_of(None).unwrap_err().contains("telemetry.listen"));
    }
}
