//! `MemoryQueue`, the reference semantics, passes the contract with a
//! visibility timeout of zero and of 300 ms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chronicle_core::MemoryQueue;
use chronicle_queue_contract::{Spec, run_contract};

/// `open(name)` for memory queues: one queue per name, shared by every
/// handle (consumers of one queue).
pub fn registry(timeout: Duration) -> impl Fn(String) -> std::future::Ready<Arc<MemoryQueue>> {
    let queues: Mutex<HashMap<String, Arc<MemoryQueue>>> = Mutex::default();
    move |name: String| {
        let q = queues
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_insert_with(|| Arc::new(MemoryQueue::new(name).with_visibility_timeout(timeout)))
            .clone();
        std::future::ready(q)
    }
}

#[tokio::test]
async fn memory_queue_passes_with_a_zero_visibility_timeout() {
    run_contract(&Spec::default(), registry(Duration::ZERO)).await;
}

#[tokio::test]
async fn memory_queue_passes_with_a_visibility_timeout() {
    let timeout = Duration::from_millis(300);
    let spec = Spec {
        visibility_timeout: timeout,
        ..Spec::default()
    };
    run_contract(&spec, registry(timeout)).await;
}
