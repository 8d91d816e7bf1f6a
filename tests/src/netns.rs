//! A network the test can cut: each silo process runs in a network namespace of its own, wired by a veth pair
//! to one bridge in the test's namespace. Cutting silos apart is bridge port isolation: isolated ports no
//! longer reach each other (frames are dropped silently, as on a real partition), but every port still
//! reaches the bridge, that is the test process — its clients, and a forwarder to Postgres. So silos lose
//! each other and keep their database, which is the partition the membership protocol must survive.
//!
//! It needs root (namespaces, veth pairs, bridges); where the machine refuses, [`IsolatedNetwork::create`]
//! says why, and the test skips saying so.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

static NEXT_NETWORK: AtomicU32 = AtomicU32::new(0);

/// One silo's namespace on the network.
#[derive(Debug, Clone)]
pub struct Namespace {
    /// The namespace name (for `ip netns exec`).
    pub name: String,
    /// Its address on the bridge's subnet.
    pub ip: Ipv4Addr,
    /// Its veth end on the bridge, in the test's namespace.
    bridge_port: String,
}

/// A bridge, one namespace per silo, and a forwarder from the bridge to Postgres; all removed when dropped.
#[derive(Debug)]
pub struct IsolatedNetwork {
    bridge: Option<String>,
    bridge_ip: Ipv4Addr,
    namespaces: Vec<Namespace>,
    postgres_forwarder: Option<(JoinHandle<()>, u16)>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

fn bridge(args: &[&str]) -> Result<(), String> {
    let output = Command::new("bridge").args(args).output().map_err(|e| format!("bridge {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("bridge {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// The `host:port` of a `postgres://[user@]host:port/db` URL, and the URL with another `host:port`.
fn split_host(url: &str) -> Option<(String, String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let at = rest.find('@').map_or(0, |i| i + 1);
    let end = rest[at..].find('/').map_or(rest.len(), |i| at + i);
    Some((format!("{scheme}://{}", &rest[..at]), rest[at..end].to_owned(), rest[end..].to_owned()))
}

impl IsolatedNetwork {
    /// A network of `silos` namespaces on a fresh bridge, with Postgres (as `database_url` names it)
    /// reachable from each through [`IsolatedNetwork::database_url`]. `Err` says why the machine cannot.
    pub async fn create(silos: usize, database_url: &str) -> Result<Self, String> {
        let n = NEXT_NETWORK.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}x{n}", std::process::id() % 100_000);
        let subnet = [10, 200 + (n % 50) as u8, (std::process::id() % 250) as u8];
        let bridge_ip = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 1);
        let mut network = IsolatedNetwork { bridge: None, bridge_ip, namespaces: Vec::new(), postgres_forwarder: None };
        let bridge_name = format!("gb{tag}");
        ip(&["link", "add", &bridge_name, "type", "bridge"])?;
        network.bridge = Some(bridge_name.clone());
        ip(&["link", "set", &bridge_name, "up"])?;
        ip(&["addr", "add", &format!("{bridge_ip}/24"), "dev", &bridge_name])?;
        for i in 0..silos {
            let name = format!("grains-{tag}-{i}");
            let (port, inside) = (format!("gp{tag}i{i}"), format!("gq{tag}i{i}"));
            let address = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 2 + i as u8);
            ip(&["netns", "add", &name])?;
            network.namespaces.push(Namespace { name: name.clone(), ip: address, bridge_port: port.clone() });
            ip(&["link", "add", &port, "type", "veth", "peer", "name", &inside])?;
            ip(&["link", "set", &inside, "netns", &name])?;
            ip(&["link", "set", &port, "master", &bridge_name])?;
            ip(&["link", "set", &port, "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&["-n", &name, "addr", "add", &format!("{address}/24"), "dev", &inside])?;
            ip(&["-n", &name, "link", "set", &inside, "up"])?;
        }
        let (_, postgres, _) = split_host(database_url).ok_or_else(|| format!("cannot read {database_url}"))?;
        let listener = TcpListener::bind((bridge_ip, 0)).await.map_err(|e| format!("bind {bridge_ip}: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let forwarder = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let postgres = postgres.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&postgres).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        network.postgres_forwarder = Some((forwarder, port));
        Ok(network)
    }

    /// Silo `i`'s namespace.
    pub fn namespace(&self, i: usize) -> &Namespace {
        &self.namespaces[i]
    }

    /// `database_url` as reachable from inside the namespaces (through the forwarder on the bridge).
    pub fn database_url(&self, database_url: &str) -> String {
        let (head, _, tail) = split_host(database_url).expect("a postgres://host:port/db URL");
        let port = self.postgres_forwarder.as_ref().map_or(0, |(_, port)| *port);
        format!("{head}{}:{port}{tail}", self.bridge_ip)
    }

    /// Cuts every silo from every other; each still reaches the test process and Postgres.
    pub fn partition(&self) -> Result<(), String> {
        for namespace in &self.namespaces {
            bridge(&["link", "set", "dev", &namespace.bridge_port, "isolated", "on"])?;
        }
        Ok(())
    }

    /// Undoes [`IsolatedNetwork::partition`].
    pub fn heal(&self) -> Result<(), String> {
        for namespace in &self.namespaces {
            bridge(&["link", "set", "dev", &namespace.bridge_port, "isolated", "off"])?;
        }
        Ok(())
    }
}

impl Drop for IsolatedNetwork {
    fn drop(&mut self) {
        if let Some((forwarder, _)) = self.postgres_forwarder.take() {
            forwarder.abort();
        }
        // Deleting a namespace deletes the veth end inside it, and with it the pair.
        for namespace in &self.namespaces {
            let _ = ip(&["link", "del", &namespace.bridge_port]);
            let _ = ip(&["netns", "del", &namespace.name]);
        }
        if let Some(bridge) = &self.bridge {
            let _ = ip(&["link", "del", bridge]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_host;

    #[test]
    fn a_database_url_splits_around_its_host_and_port() {
        let (head, host, tail) = split_host("postgres://postgres@127.0.0.1:5432/grains_x?sslmode=disable").unwrap();
        assert_eq!(
            (head.as_str(), host.as_str(), tail.as_str()),
            ("postgres://postgres@", "127.0.0.1:5432", "/grains_x?sslmode=disable")
        );
        let (head, host, tail) = split_host("postgres://localhost:5433").unwrap();
        assert_eq!((head.as_str(), host.as_str(), tail.as_str()), ("postgres://", "localhost:5433", ""));
    }
}
