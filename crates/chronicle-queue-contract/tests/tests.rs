//! The contract proven on the queues that define it (`MemoryQueue`, the
//! PostgreSQL dead-letter queue) and shown to fail on broken ones.

mod broken;
mod memory;
mod postgres;
