//! The relay and the stream consumer against real PostgreSQL, NATS
//! JetStream and RabbitMQ on loopback (`CHRONICLE_NATS_URL`,
//! `CHRONICLE_AMQP_URL`); a broker that is not there fails the tests.

mod consumer;
mod kill9;
mod restart;
mod round_trip;
mod support;
