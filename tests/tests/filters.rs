//! Call filters and request metadata: a silo's filters see who calls what and may refuse it; metadata a
//! caller sets travels with its call and with every call made while serving it, across silos.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use grains::RequestMetadata;
use grains::prelude::*;
use grains_examples::auth::require_bearer_token;
use grains_silo::{CallInfo, CallerIdentity, Client, ClientConfig, Silo, SiloConfig};
use grains_tests::tls::TestCa;
use grains_tests::{Counter, Peer, start_cluster, test_config};

/// Calls another grain and reports what it and the other grain read from the request metadata.
#[grain(placement = "prefer_local")]
pub struct Relay {
    ctx: GrainContext,
}

#[grain]
impl Relay {
    /// Nothing: activates the grain where the caller is.
    pub async fn touch(&self) {}

    /// The value of `key` as this grain sees it, and as `Reader(reader)` sees it when this grain calls it.
    pub async fn relay(&self, reader: String, key: String) -> Result<(Option<String>, Option<String>), CallError> {
        let here = self.ctx.request_metadata().get(&key).map(str::to_owned);
        let there = self.ctx.grain::<Reader>(reader).read(key).await?;
        Ok((here, there))
    }
}

/// Reads the request metadata of the call it serves.
#[grain(placement = "prefer_local")]
pub struct Reader;

#[grain]
impl Reader {
    /// The value of `key` in the metadata of this call.
    pub async fn read(&self, key: String) -> Option<String> {
        RequestMetadata::current().get(&key).map(str::to_owned)
    }
}

fn listening() -> SiloConfig {
    SiloConfig { gateway: true, port: 0, ..test_config() }
}

fn url(silo: &Silo) -> String {
    format!("http://{}", silo.gateway_addr().expect("the silo listens"))
}

fn is_denied<T: std::fmt::Debug>(result: &Result<T, CallError>) -> bool {
    matches!(result, Err(CallError::PermissionDenied(_)))
}

#[tokio::test]
async fn a_token_filter_refuses_clients_without_a_valid_token_and_passes_the_rest() {
    let silo =
        Silo::builder().config(listening()).incoming_filter(require_bearer_token(["s3cret"])).start().await.unwrap();
    let with_token = |token: Option<&str>| ClientConfig { bearer_token: token.map(Into::into), ..Default::default() };

    let anonymous = Client::connect_with(url(&silo), with_token(None)).await.expect("connecting needs no token");
    let refused = anonymous.grain::<Counter>("filtered").increment().await;
    assert!(is_denied(&refused), "{refused:?}");
    let impostor = Client::connect_with(url(&silo), with_token(Some("guess"))).await.unwrap();
    let refused = impostor.grain::<Counter>("filtered").increment().await;
    assert!(is_denied(&refused), "{refused:?}");

    let member = Client::connect_with(url(&silo), with_token(Some("s3cret"))).await.unwrap();
    assert_eq!(member.grain::<Counter>("filtered").increment().await.unwrap().unwrap(), 1, "refused calls never ran");
    // The grain's own call to another grain, and a call from the silo's process, are inside the cluster.
    let asked = member.grain::<Peer>("filtered-a").ask_name("filtered-b".into()).await.unwrap();
    assert_eq!(asked.unwrap(), "filtered-b");
    assert_eq!(silo.grain::<Counter>("filtered").increment().await.unwrap().unwrap(), 2);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_filter_sees_the_subject_of_a_tls_client_certificate() {
    let ca = TestCa::new("grains test CA");
    let server = ca.server();
    let config = SiloConfig {
        tls_cert: Some(server.cert),
        tls_key: Some(server.key),
        tls_client_ca: Some(ca.cert()),
        ..listening()
    };
    let silo = Silo::builder()
        .config(config)
        .incoming_filter(|call: &CallInfo<'_>| match call.caller {
            CallerIdentity::Client(client) if client.certificate_subject.as_deref() == Some("CN=alice") => Ok(()),
            CallerIdentity::Client(client) => {
                Err(CallError::PermissionDenied(format!("not alice: {:?}", client.certificate_subject)))
            }
            _ => Ok(()),
        })
        .start()
        .await
        .unwrap();
    let addr = format!("https://127.0.0.1:{}", silo.gateway_addr().unwrap().port());
    let as_holder_of = |pair: Option<grains_tests::tls::Pair>| ClientConfig {
        tls_ca: Some(ca.cert()),
        tls_cert: pair.as_ref().map(|p| p.cert.clone()),
        tls_key: pair.map(|p| p.key),
        ..Default::default()
    };
    let alice = Client::connect_with(&addr, as_holder_of(Some(ca.client("alice")))).await.unwrap();
    assert_eq!(alice.grain::<Peer>("cert-a").name().await.unwrap(), "cert-a");
    let bob = Client::connect_with(&addr, as_holder_of(Some(ca.client("bob")))).await.unwrap();
    let refused = bob.grain::<Peer>("cert-b").name().await;
    assert!(is_denied(&refused), "{refused:?}");
    let nobody = Client::connect_with(&addr, as_holder_of(None)).await.expect("the certificate is optional");
    let refused = nobody.grain::<Peer>("cert-c").name().await;
    assert!(is_denied(&refused), "{refused:?}");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_outgoing_filter_sees_the_calling_grain_and_can_refuse_its_calls() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let silo = Silo::builder()
        .config(test_config())
        .outgoing_filter(move |call: &CallInfo<'_>| {
            log.lock().unwrap().push((call.caller.clone(), call.grain.to_string()));
            if call.grain.key().to_string() == "outgoing-forbidden" {
                return Err(CallError::PermissionDenied("no calls to outgoing-forbidden".into()));
            }
            Ok(())
        })
        .start()
        .await
        .unwrap();
    let caller = silo.grain::<Peer>("outgoing-a");
    assert_eq!(caller.ask_name("outgoing-b".into()).await.unwrap().unwrap(), "outgoing-b");
    let refused = caller.ask_name("outgoing-forbidden".into()).await.unwrap();
    assert!(is_denied(&refused), "{refused:?}");
    // Not a grain's call: outgoing filters do not see it.
    assert_eq!(silo.grain::<Peer>("outgoing-forbidden").name().await.unwrap(), "outgoing-forbidden");
    let seen = seen.lock().unwrap().clone();
    let from_a = CallerIdentity::Grain(GrainId::new("Peer", "outgoing-a"));
    assert_eq!(
        seen,
        vec![(from_a.clone(), "Peer/outgoing-b".to_owned()), (from_a, "Peer/outgoing-forbidden".to_owned())]
    );
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_set_by_a_client_reaches_a_grain_two_hops_away_on_another_silo() {
    let silos = start_cluster(2).await;
    // Relay "a" lives on silo 0 and Reader "b" on silo 1: each is placed next to its first caller.
    silos[0].grain::<Relay>("meta-a").touch().await.unwrap();
    silos[1].grain::<Reader>("meta-b").read("warm-up".into()).await.unwrap();
    assert!(silos[0].is_active(&GrainId::new("Relay", "meta-a")));
    assert!(silos[1].is_active(&GrainId::new("Reader", "meta-b")));

    let client = Client::connect(url(&silos[0])).await.unwrap();
    let relay = client.grain::<Relay>("meta-a");
    let metadata = RequestMetadata::new().with("trace", "t-42").with("tenant", "acme");
    let seen = metadata.scope(relay.relay("meta-b".into(), "trace".into())).await.unwrap().unwrap();
    assert_eq!(seen, (Some("t-42".to_owned()), Some("t-42".to_owned())), "client → a (silo 0) → b (silo 1)");
    // Without a scope, nothing travels.
    let bare = relay.relay("meta-b".into(), "trace".into()).await.unwrap().unwrap();
    assert_eq!(bare, (None, None));
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
}
