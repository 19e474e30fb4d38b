//! A process's connections to the API servers, seen and cut from outside
//! (`ss`), to find the agent's watch and drop it the way a broken network
//! path or a load balancer would.

use std::net::SocketAddr;

use super::APISERVER_PORT;

/// One established TCP connection: (local, peer).
pub type Conn = (SocketAddr, SocketAddr);

/// Established connections of process `pid` to any API server port.
pub fn api_connections(pid: u32) -> Vec<Conn> {
    let filter = format!("( dport = :{APISERVER_PORT} )");
    let out = crate::sh("ss", &["-tnpH", "state", "established", &filter]);
    let needle = format!("pid={pid},");
    out.lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer Process
            Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
        })
        .collect()
}

/// The connections `pid` keeps open: those seen in two samples `gap` apart,
/// so short-lived probes and lists do not count. Its watch is one of them,
/// but not always the only one: its HTTP client keeps idle connections
/// pooled (seen: after a relist the watch ran on a new connection while the
/// one that had carried the expired watch stayed open), so a test that
/// means to drop the watch drops them all.
pub fn long_lived_api_connections(pid: u32, gap: std::time::Duration) -> Vec<Conn> {
    let first = api_connections(pid);
    std::thread::sleep(gap);
    let second = api_connections(pid);
    first.into_iter().filter(|c| second.contains(c)).collect()
}

/// Aborts each connection (sock_diag SOCK_DESTROY, `ss -K`): the process
/// sees it reset, as when a middlebox or the peer drops it.
pub fn kill_connections(conns: &[Conn]) {
    for conn in conns {
        kill_connection(conn);
    }
}

fn kill_connection(conn: &Conn) {
    let (local, peer) = conn;
    crate::sh(
        "ss",
        &[
            "-K",
            "-tn",
            "dst",
            &peer.ip().to_string(),
            "dport",
            "=",
            &format!(":{}", peer.port()),
            "sport",
            "=",
            &format!(":{}", local.port()),
        ],
    );
}
