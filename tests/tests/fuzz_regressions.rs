//! Hostile payloads found while fuzzing (`fuzz/`, `scripts/fuzz`), each kept as a test against a real silo.

use std::time::Duration;

use grains::__private::runtime::{Call, Payload};
use grains::prelude::*;
use grains_silo::{Client, SiloConfig};

/// An argument type whose nesting only the input bounds (like `serde_json::Value`).
#[derive(Debug, Serialize, Deserialize)]
pub enum Tree {
    /// No children.
    Leaf(i64),
    /// Two children.
    Node(Box<Tree>, Box<Tree>),
}

impl Tree {
    fn depth(&self) -> usize {
        match self {
            Tree::Leaf(_) => 1,
            Tree::Node(left, right) => 1 + left.depth().max(right.depth()),
        }
    }
}

/// Takes a recursive argument.
#[grain]
pub struct Forest;

#[grain]
impl Forest {
    /// The depth of `tree`.
    pub async fn depth(&self, tree: Tree) -> usize {
        tree.depth()
    }
}

/// The encoded arguments of `depth(tree)` for a tree `levels` nodes deep, written by hand: building the value
/// and encoding it would recurse as deeply as decoding it.
fn nested_tree_call(levels: usize) -> Vec<u8> {
    const NODE: [u8; 7] = [0x81, 0xa4, b'N', b'o', b'd', b'e', 0x92]; // {"Node": [left, right]}
    const LEAF: [u8; 7] = [0x81, 0xa4, b'L', b'e', b'a', b'f', 0x01]; // {"Leaf": 1}
    let mut out = vec![0x91]; // one argument
    for _ in 0..levels {
        out.extend_from_slice(&NODE);
    }
    for _ in 0..=levels {
        out.extend_from_slice(&LEAF);
    }
    out
}

/// Decoding recursed once per level on the runtime's worker thread (2 MiB of stack): a 7 KB argument nested
/// 1,000 deep overflowed it and aborted the silo process (in a debug build; a release build has less
/// headroom left the deeper a type's levels are). Nesting is now bounded, and too deep is a codec error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_argument_is_a_codec_error_not_a_stack_overflow() {
    let config = SiloConfig { port: 0, gateway: true, ..grains_tests::test_config() };
    let silo = grains_tests::start_silo(config).await;
    let client = Client::connect(format!("http://{}", silo.gateway_addr().unwrap())).await.unwrap();
    for levels in [1_000, 100_000] {
        let call = Call {
            target: GrainId::new("Forest", "deep"),
            method: "depth".into(),
            payload: Payload::Encoded(nested_tree_call(levels).into()),
            deadline: tokio::time::Instant::now() + Duration::from_secs(30),
            issued: tokio::time::Instant::now(),
            chain: Vec::new().into(),
            metadata: Default::default(),
        };
        let outcome = client.runtime().invoke(call).await;
        assert!(matches!(outcome, Err(CallError::Codec(ref m)) if m.contains("depth")), "{levels} levels: {outcome:?}");
    }
    // Moderate nesting still decodes, and the silo still serves.
    let tree = (0..20).fold(Tree::Leaf(0), |tree, i| Tree::Node(Box::new(tree), Box::new(Tree::Leaf(i))));
    assert_eq!(client.grain::<Forest>("shallow").depth(tree).await.unwrap(), 21);
    silo.shutdown(Duration::from_secs(5)).await;
}
