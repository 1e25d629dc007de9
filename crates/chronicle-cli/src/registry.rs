//! The projection handlers and Rust upcasters a `chronicle` binary carries.

use std::collections::BTreeMap;
use std::sync::Arc;

use chronicle_core::ProjectionHandler;
use chronicle_projections::{HandlerRegistry, PgContext};
use chronicle_upcast::Upcaster;

/// The handlers compiled into this binary, and the SQL each needs run
/// before it starts (its read-model tables, idempotently).
///
/// The stock `chronicle` binary carries the demo's `user-profile`
/// projection ([`Registry::with_demo`]). An application ships the same CLI
/// with its own handlers:
///
/// ```no_run
/// # use chronicle_core::{EventEnvelope, ProjectionHandler, ProjectionResult};
/// # use chronicle_projections::PgContext;
/// # struct Orders;
/// # #[async_trait::async_trait]
/// # impl ProjectionHandler<PgContext> for Orders {
/// #     fn name(&self) -> &str { "orders" }
/// #     async fn handle(&self, _: &EventEnvelope, _: &mut PgContext) -> ProjectionResult { ProjectionResult::Done }
/// # }
/// fn main() -> std::process::ExitCode {
///     let mut registry = chronicle_cli::Registry::new();
///     registry.projection(Orders, "CREATE TABLE IF NOT EXISTS orders (id UUID PRIMARY KEY)");
///     chronicle_cli::run(registry)
/// }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Registry {
    handlers: HandlerRegistry,
    setup: BTreeMap<String, String>,
    schemas: BTreeMap<String, String>,
    upcasters: Vec<Arc<dyn Upcaster>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// The stock binary's registry: the `user-profile` projection of
    /// `chronicle demo`, with its read model in the schema `user_profile`
    /// (the projection `examples/user-profile` defines and its Cloudflare
    /// Worker runs, under the same name, subscription and table).
    ///
    /// ```
    /// let registry = chronicle_cli::Registry::with_demo();
    /// assert!(registry.handlers().get("user-profile").is_some());
    /// assert_eq!(registry.read_model_schema("user-profile"), Some("user_profile"));
    /// ```
    pub fn with_demo() -> Self {
        use crate::demo::profile;
        let mut registry = Registry::new();
        registry.projection_in_schema(
            profile::ProfileProjection::default(),
            profile::READ_MODEL_SCHEMA,
            profile::READ_MODEL_DDL,
        );
        registry
    }

    /// Registers `handler` under its name, with the SQL (possibly empty)
    /// that creates what it writes to; the SQL must be idempotent.
    pub fn projection(
        &mut self,
        handler: impl ProjectionHandler<PgContext> + 'static,
        setup_sql: &str,
    ) -> &mut Self {
        self.setup
            .insert(handler.name().to_owned(), setup_sql.to_owned());
        self.handlers.register(handler);
        self
    }

    /// Registers `handler` with its read model in the PostgreSQL schema
    /// `schema` (created if missing; `setup_sql` runs with it first on the
    /// search path, and so do the handler's writes). Such a projection can
    /// be rebuilt blue/green: `chronicle projections rebuild NAME
    /// --blue-green`.
    pub fn projection_in_schema(
        &mut self,
        handler: impl ProjectionHandler<PgContext> + 'static,
        schema: &str,
        setup_sql: &str,
    ) -> &mut Self {
        self.schemas
            .insert(handler.name().to_owned(), schema.to_owned());
        self.projection(handler, setup_sql)
    }

    /// The schema of the read model of the handler named `name`, if it
    /// has its own.
    pub fn read_model_schema(&self, name: &str) -> Option<&str> {
        self.schemas.get(name).map(String::as_str)
    }

    /// Adds an upcaster written in Rust. `chronicle upcast` chains it with
    /// the YAML definitions (`--config`); with no YAML file at the default
    /// path, the Rust upcasters alone are the definitions.
    ///
    /// ```
    /// use chronicle_upcast::FnUpcaster;
    ///
    /// let mut registry = chronicle_cli::Registry::new();
    /// registry.upcaster(FnUpcaster::new("UserRegistered", 1, |event| {
    ///     event.data["verified"] = false.into();
    ///     Ok(())
    /// }));
    /// // fn main() -> std::process::ExitCode { chronicle_cli::run(registry) }
    /// ```
    pub fn upcaster(&mut self, upcaster: impl Upcaster + 'static) -> &mut Self {
        self.upcasters.push(Arc::new(upcaster));
        self
    }

    /// The Rust upcasters, in the order added.
    pub fn upcasters(&self) -> &[Arc<dyn Upcaster>] {
        &self.upcasters
    }

    /// The handlers, by name.
    pub fn handlers(&self) -> &HandlerRegistry {
        &self.handlers
    }

    /// The setup SQL of the handler named `name`.
    pub fn setup_sql(&self, name: &str) -> Option<&str> {
        self.setup
            .get(name)
            .map(String::as_str)
            .filter(|s| !s.trim().is_empty())
    }
}
