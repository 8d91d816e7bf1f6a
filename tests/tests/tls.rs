//! TLS on the silo's port: clients and peer silos that trust the cluster's CA talk to it; a plaintext client
//! or one that does not trust the CA is refused at once, without a hang. Certificates are made at run time.

use std::collections::HashSet;
use std::time::Duration;

use grains::GrainId;
use grains_silo::{Client, ClientConfig, ConnectError, Silo, SiloConfig};
use grains_tests::tls::TestCa;
use grains_tests::{Counter, Peer, start_cluster_with, start_silo, test_config};

/// `config`, serving TLS with a certificate from `ca` and trusting `ca` for its peers.
fn with_tls(config: SiloConfig, ca: &TestCa) -> SiloConfig {
    let server = ca.server();
    SiloConfig { tls_cert: Some(server.cert), tls_key: Some(server.key), tls_ca: Some(ca.cert()), ..config }
}

async fn tls_silo(ca: &TestCa) -> (Silo, String) {
    let silo = start_silo(with_tls(SiloConfig { gateway: true, port: 0, ..test_config() }, ca)).await;
    let addr = silo.gateway_addr().expect("the silo listens");
    (silo, format!("127.0.0.1:{}", addr.port()))
}

/// Connecting must end, one way or the other, well within this.
const NO_HANG: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_client_that_trusts_the_ca_calls_grains_through_a_tls_gateway() {
    let ca = TestCa::new("grains test CA");
    let (silo, addr) = tls_silo(&ca).await;
    let config = ClientConfig { tls_ca: Some(ca.cert()), ..ClientConfig::default() };
    let client = Client::connect_with(format!("https://{addr}"), config).await.expect("a TLS client connects");
    let counter = client.grain::<Counter>("tls-client");
    assert_eq!(counter.increment().await.unwrap().unwrap(), 1);
    assert_eq!(counter.increment().await.unwrap().unwrap(), 2);
    assert_eq!(client.gateways(), vec![addr], "the gateway list came back over TLS");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_plaintext_client_is_refused_by_a_tls_gateway_without_hanging() {
    let ca = TestCa::new("grains test CA");
    let (silo, addr) = tls_silo(&ca).await;
    let refused = tokio::time::timeout(NO_HANG, Client::connect(format!("http://{addr}"))).await;
    let refused = refused.expect("a plaintext client is refused, not left hanging");
    assert!(matches!(refused, Err(ConnectError::Unreachable { .. })), "{refused:?}");
    // The refusal disturbed nothing: a TLS client still gets in.
    let config = ClientConfig { tls_ca: Some(ca.cert()), ..ClientConfig::default() };
    let client = Client::connect_with(format!("https://{addr}"), config).await.unwrap();
    assert_eq!(client.grain::<Peer>("after-plaintext").name().await.unwrap(), "after-plaintext");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_gateways_ca_is_refused() {
    let ca = TestCa::new("grains test CA");
    let (silo, addr) = tls_silo(&ca).await;
    let stranger = TestCa::new("some other CA");
    for tls_ca in [Some(stranger.cert()), None] {
        let system_roots = tls_ca.is_none();
        let config = ClientConfig { tls_ca, ..ClientConfig::default() };
        let refused = tokio::time::timeout(NO_HANG, Client::connect_with(format!("https://{addr}"), config)).await;
        let refused = refused.expect("an untrusting client fails, not hangs");
        match refused {
            Err(ConnectError::Unreachable { reason, .. }) => {
                assert!(reason.contains("certificate") || reason.contains("Certificate"), "{reason}");
            }
            // A machine without system roots fails earlier, at set-up: refused all the same.
            Err(ConnectError::Tls(_)) if system_roots => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_silos_serving_tls_route_calls_to_each_other() {
    let ca = TestCa::new("grains cluster CA");
    let silos = start_cluster_with(2, |config| with_tls(config, &ca)).await;
    let keys: Vec<String> = (0..200).map(|i| format!("tls-spread-{i}")).collect();
    for key in &keys {
        assert_eq!(silos[0].grain::<Peer>(key.as_str()).name().await.unwrap(), *key);
    }
    let on_second: HashSet<GrainId> = silos[1].active_grains().into_iter().collect();
    let remote = keys.iter().filter(|k| on_second.contains(&GrainId::new("Peer", k.as_str()))).count();
    assert!(remote > 20, "only {remote} of 200 grains were placed on the other silo");
    // And back: grains on either silo call grains on the other.
    for i in 0..50 {
        let (a, b) = (&keys[i], &keys[199 - i]);
        assert_eq!(silos[1].grain::<Peer>(a.as_str()).ask_name(b.clone()).await.unwrap().unwrap(), *b);
    }
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn a_silo_that_does_not_trust_its_peers_ca_cannot_reach_them() {
    let ca = TestCa::new("grains cluster CA");
    let stranger = TestCa::new("some other CA");
    let silos = start_cluster_with(2, |config| {
        let trusted = if config.name == "silo-1" { stranger.cert() } else { ca.cert() };
        SiloConfig { tls_ca: Some(trusted), ..with_tls(config, &ca) }
    })
    .await;
    // silo-1 cannot verify silo-0: every grain silo-0 would host is out of its reach.
    let keys: Vec<String> = (0..40).map(|i| format!("tls-untrusted-{i}")).collect();
    let mut refused = 0;
    for key in &keys {
        let peer = silos[1].grain::<Peer>(key.as_str());
        let core = grains::GrainRef::core(&peer).with_timeout(Duration::from_secs(2));
        let peer = <grains_tests::PeerRef as grains::GrainRef>::from_core(core);
        if peer.name().await.is_err() {
            refused += 1;
        }
    }
    assert!(refused > 0, "silo-1 reached silo-0 although it does not trust its certificate");
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
}
