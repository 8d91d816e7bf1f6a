//! Who may call what: the cluster's system calls are served only to its silos. A client connection, or a silo
//! with the wrong secret, changes nothing in the membership table or the directory.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use grains::{CallError, GrainId, Placement};
use grains_silo::cluster::Registration;
use grains_silo::wire::{Envelope, Mode, WireGrainId};
use grains_silo::{Client, Silo, SiloConfig};
use grains_storage::{MembershipEntry, MembershipTable, MemoryMembershipTable, SiloAddress, SiloStatus};
use grains_tests::raw_stream::RawEnvelopeStream;
use grains_tests::{Counter, LIFECYCLE};
use serde::Serialize;

/// The silo's system requests as an outsider would write them: same names, same shapes, same encoding.
#[derive(Debug, Clone, Serialize)]
enum SystemRequest {
    Ping,
    Gateways,
    LookupOrPlace { grain: GrainId, caller: SiloAddress, placement: Placement, view: ViewStamp },
    Register { entries: Vec<(GrainId, Registration)>, view: ViewStamp },
    Unregister { grain: GrainId, registration: Registration },
    MembershipChanged,
    Activations,
    Table(TableOp),
    Recover { requester: SiloAddress, view: ViewStamp },
    Evict { grain: GrainId, registration: Registration },
    Draining { silo: SiloAddress },
}

/// The membership view a directory request names.
#[derive(Debug, Clone, Copy, Serialize)]
struct ViewStamp {
    version: i64,
    ring_id: u64,
}

#[derive(Debug, Clone, Serialize)]
enum TableOp {
    ReadAll,
    Insert { entry: MembershipEntry, expected_version: i64 },
    Update { entry: MembershipEntry, etag: String, expected_version: i64 },
    Heartbeat { silo: SiloAddress, at_ms: i64 },
}

async fn silo_listening(table: Arc<MemoryMembershipTable>) -> Silo {
    let config = SiloConfig { port: 0, gateway: true, ..grains_tests::test_config() };
    Silo::builder().config(config).membership_table(table).start().await.unwrap()
}

/// The rows as the cluster reads them, less the heartbeat the silo itself writes now and then.
fn without_heartbeats(snapshot: &grains_storage::MembershipSnapshot) -> Vec<MembershipEntry> {
    snapshot.rows.iter().map(|r| MembershipEntry { heartbeat_at_ms: 0, ..r.entry.clone() }).collect()
}

fn permission_denied(result: &Result<Bytes, CallError>) -> bool {
    matches!(result, Err(CallError::PermissionDenied(message)) if message.contains("system"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_calls_from_a_client_connection_are_refused_and_change_nothing() {
    let table = Arc::new(MemoryMembershipTable::new());
    let silo = silo_listening(table.clone()).await;
    let victim = GrainId::new("Counter", "system-access-victim");
    assert_eq!(silo.grain::<Counter>("system-access-victim").increment().await.unwrap().unwrap(), 1);
    let rows_before = table.read_all().await.unwrap();
    let directory_before = silo.metrics().directory_entries;

    let mut outsider = RawEnvelopeStream::open(&format!("http://{}", silo.gateway_addr().unwrap())).await;
    let fake = SiloAddress { endpoint: "127.0.0.1:1".into(), epoch: 1 };
    let view = silo.cluster_view();
    let view = ViewStamp { version: view.version(), ring_id: view.ring_id() };
    let mut refused = Vec::new();
    for request in [
        SystemRequest::Ping,
        SystemRequest::Activations,
        SystemRequest::MembershipChanged,
        SystemRequest::LookupOrPlace {
            grain: victim.clone(),
            caller: fake.clone(),
            placement: Placement::Random,
            view,
        },
        SystemRequest::Register {
            entries: vec![(GrainId::new("Counter", "planted"), Registration { silo: fake.clone(), id: 7 })],
            view,
        },
        SystemRequest::Recover { requester: fake.clone(), view },
        SystemRequest::Draining { silo: silo.address().clone() },
        SystemRequest::Table(TableOp::ReadAll),
        SystemRequest::Table(TableOp::Heartbeat { silo: fake.clone(), at_ms: 1 }),
    ] {
        refused.push((format!("{request:?}"), outsider.system(&request).await));
    }
    // What an outsider would do with what it learned: unregister the victim's entry, mark the silo dead,
    // insert a row of its own.
    let own = table.read_all().await.unwrap().rows[0].clone();
    let version = rows_before.version;
    let dead = MembershipEntry { status: SiloStatus::Dead, ..own.entry.clone() };
    let planted = MembershipEntry { silo: fake.clone(), ..own.entry.clone() };
    for request in [
        SystemRequest::Unregister {
            grain: victim.clone(),
            registration: Registration { silo: silo.address().clone(), id: 0 },
        },
        SystemRequest::Evict {
            grain: victim.clone(),
            registration: Registration { silo: silo.address().clone(), id: 0 },
        },
        SystemRequest::Table(TableOp::Update { entry: dead, etag: own.etag.clone(), expected_version: version }),
        SystemRequest::Table(TableOp::Insert { entry: planted, expected_version: version }),
    ] {
        refused.push((format!("{request:?}"), outsider.system(&request).await));
    }
    for (request, result) in &refused {
        assert!(permission_denied(result), "{request} was not refused: {result:?}");
    }

    // Grain calls that only silos make (deliver here, skipping the directory) are refused too.
    let placed = Envelope {
        target: Some(WireGrainId::from(&victim)),
        method: "get".into(),
        payload: grains::codec::encode(&()).unwrap().into(),
        mode: Mode::Placed as i32,
        ..Default::default()
    };
    let result = outsider.call(placed).await;
    assert!(matches!(result, Err(CallError::PermissionDenied(_))), "{result:?}");

    // The gateway list stays open: the external client needs it.
    assert!(outsider.system(&SystemRequest::Gateways).await.is_ok());
    // And ordinary grain calls on the same connection still work.
    let get = Envelope {
        target: Some(WireGrainId::from(&victim)),
        method: "get".into(),
        payload: grains::codec::encode(&()).unwrap().into(),
        ..Default::default()
    };
    let value: u64 = grains::codec::decode(&outsider.call(get).await.unwrap()).unwrap();
    assert_eq!(value, 1);

    // Nothing changed: the table, the directory, the victim's one activation.
    let rows_after = table.read_all().await.unwrap();
    assert_eq!(rows_after.version, rows_before.version);
    assert_eq!(without_heartbeats(&rows_after), without_heartbeats(&rows_before));
    assert_eq!(silo.metrics().directory_entries, directory_before);
    assert_eq!(silo.grain::<Counter>("system-access-victim").increment().await.unwrap().unwrap(), 2);
    assert_eq!(LIFECYCLE.activations("system-access-victim"), 1);
    assert!(!silo.is_stopped());
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_external_client_still_learns_the_gateways() {
    let silo = silo_listening(Arc::new(MemoryMembershipTable::new())).await;
    let client = Client::connect(format!("http://{}", silo.gateway_addr().unwrap())).await.unwrap();
    assert_eq!(client.gateways(), vec![silo.address().endpoint.clone()]);
    let refused = client.active_grains(&silo.address().endpoint).await;
    assert!(matches!(refused, Err(CallError::PermissionDenied(_))), "{refused:?}");
    silo.shutdown(Duration::from_secs(5)).await;
}

fn seed_config(secret: Option<&str>) -> SiloConfig {
    SiloConfig {
        port: 0,
        gateway: true,
        failure_detection: grains_silo::FailureDetection::Fast,
        cluster_secret: secret.map(Into::into),
        ..grains_tests::test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_with_another_secret_cannot_join_and_one_with_the_secret_can() {
    let seed = Silo::builder().config(seed_config(Some("alpha"))).start().await.unwrap();
    let seed_addr = silo_endpoint(&seed);

    let intruder = SiloConfig { seed: Some(seed_addr.clone()), name: "intruder".into(), ..seed_config(Some("beta")) };
    match Silo::builder().config(intruder).start().await {
        Ok(silo) => {
            silo.shutdown(Duration::from_secs(1)).await;
            panic!("a silo with the wrong secret joined the cluster");
        }
        Err(error) => assert!(error.to_string().contains("permission denied"), "{error}"),
    }
    let no_secret = SiloConfig { seed: Some(seed_addr.clone()), name: "no-secret".into(), ..seed_config(None) };
    assert!(Silo::builder().config(no_secret).start().await.is_err(), "a silo without the secret joined");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(seed.cluster_view().rows().len(), 1, "{:?}", seed.cluster_view().rows());

    let member = SiloConfig { seed: Some(seed_addr), name: "member".into(), ..seed_config(Some("alpha")) };
    let member = Silo::builder().config(member).start().await.unwrap();
    let both = [seed, member];
    grains_tests::wait_for_active(&both, 2).await;
    // Calls route between them over authenticated peer connections.
    for i in 0..20 {
        let key = format!("secret-cluster-{i}");
        assert_eq!(both[i % 2].grain::<Counter>(key.as_str()).increment().await.unwrap().unwrap(), 1);
    }
    let [seed, member] = both;
    member.shutdown(Duration::from_secs(5)).await;
    seed.shutdown(Duration::from_secs(5)).await;
}

fn silo_endpoint(silo: &Silo) -> String {
    silo.address().endpoint.clone()
}

#[tokio::test]
async fn a_silo_on_a_public_address_starts_only_with_a_secret_or_insecure() {
    let public = SiloConfig { host: "0.0.0.0".parse().unwrap(), port: 0, gateway: true, ..grains_tests::test_config() };
    let error = Silo::builder().config(public.clone()).start().await.expect_err("started without a secret");
    assert!(error.to_string().contains("--insecure"), "{error}");
    for allowed in
        [SiloConfig { insecure: true, ..public.clone() }, SiloConfig { cluster_secret: Some("s".into()), ..public }]
    {
        let silo = Silo::builder().config(allowed).start().await.unwrap();
        silo.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_secret_may_ask_for_activations_and_one_with_a_wrong_secret_is_refused() {
    let silo = Silo::builder().config(seed_config(Some("alpha"))).start().await.unwrap();
    silo.grain::<Counter>("member-diagnostics").increment().await.unwrap().unwrap();
    let url = format!("http://{}", silo.gateway_addr().unwrap());
    let member = |secret: &str| grains_silo::ClientConfig {
        member: Some(grains_silo::ClusterCredentials {
            cluster_id: silo.config().cluster_id.clone(),
            secret: Some(secret.into()),
        }),
        ..Default::default()
    };
    let client = Client::connect_with(&url, member("alpha")).await.unwrap();
    let active = client.active_grains(&silo_endpoint(&silo)).await.unwrap();
    assert!(active.contains(&GrainId::new("Counter", "member-diagnostics")), "{active:?}");

    let refused = Client::connect_with(&url, member("beta")).await.expect_err("a wrong secret was accepted");
    assert!(refused.to_string().contains("permission denied"), "{refused}");
    silo.shutdown(Duration::from_secs(5)).await;
}
