//! A deployed worker's options as text variables: the deploying side
//! ([`to_vars`]) and the worker ([`from_vars`]) share these names and
//! formats, so what a deployment file asks for is what the worker runs
//! with, whatever options were compiled into it.

use std::time::Duration;

use chronicle_core::Subscription;

use crate::ProjectionOptions;

/// The partition count.
pub const PARTITIONS: &str = "CHRONICLE_PARTITIONS";
/// Events per step.
pub const BATCH_SIZE: &str = "CHRONICLE_BATCH_SIZE";
/// Retries before an event is dead-lettered.
pub const MAX_RETRIES: &str = "CHRONICLE_MAX_RETRIES";
/// How long one handler call may take, in milliseconds.
pub const HANDLER_TIMEOUT_MS: &str = "CHRONICLE_HANDLER_TIMEOUT_MS";
/// The subscription, as JSON (absent: the handler's own).
pub const SUBSCRIPTION: &str = "CHRONICLE_SUBSCRIPTION";
/// How long one serverless invocation may spend stepping, in milliseconds
/// (read by the worker runtime, not part of the options).
pub const BUDGET_MS: &str = "CHRONICLE_BUDGET_MS";
/// The lease owner a serverless worker writes into `projection_state`
/// (read by the worker runtime).
pub const WORKER_ID: &str = "CHRONICLE_WORKER_ID";

/// The variables that carry `options` (the ones a deployment file sets).
///
/// ```
/// use chronicle_step::{ProjectionOptions, vars};
///
/// let options = ProjectionOptions { partitions: 8, ..ProjectionOptions::default() };
/// let text = vars::to_vars(&options);
/// let back = vars::from_vars(ProjectionOptions::default(), |name| {
///     text.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
/// })
/// .unwrap();
/// assert_eq!(back.partitions, 8);
/// ```
pub fn to_vars(options: &ProjectionOptions) -> Vec<(&'static str, String)> {
    let mut vars = vec![
        (PARTITIONS, options.partitions.to_string()),
        (BATCH_SIZE, options.batch_size.to_string()),
        (MAX_RETRIES, options.retry.max_retries.to_string()),
        (
            HANDLER_TIMEOUT_MS,
            options.handler_timeout.as_millis().to_string(),
        ),
    ];
    if let Some(subscription) = &options.subscription {
        vars.push((
            SUBSCRIPTION,
            serde_json::to_string(subscription).expect("a subscription serializes"),
        ));
    }
    vars
}

/// `base` with what the variables `var` finds override; a variable that
/// does not parse is an error naming it, never ignored.
pub fn from_vars(
    base: ProjectionOptions,
    var: impl Fn(&str) -> Option<String>,
) -> Result<ProjectionOptions, String> {
    let number = |name: &str| -> Result<Option<u64>, String> {
        var(name)
            .map(|text| {
                text.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("{name} is `{text}`, not a whole number"))
            })
            .transpose()
    };
    let small = |name: &str| -> Result<Option<u32>, String> {
        number(name)?
            .map(|n| u32::try_from(n).map_err(|_| format!("{name} is {n}, too large")))
            .transpose()
    };
    let mut options = base;
    if let Some(n) = small(PARTITIONS)? {
        options.partitions = n;
    }
    if let Some(n) = small(BATCH_SIZE)? {
        options.batch_size = n;
    }
    if let Some(n) = small(MAX_RETRIES)? {
        options.retry.max_retries = n;
    }
    if let Some(ms) = number(HANDLER_TIMEOUT_MS)? {
        options.handler_timeout = Duration::from_millis(ms);
    }
    if let Some(json) = var(SUBSCRIPTION) {
        let subscription: Subscription = serde_json::from_str(&json)
            .map_err(|e| format!("{SUBSCRIPTION} is not a subscription: {e}"))?;
        options.subscription = Some(subscription);
    }
    options.validate().map_err(|e| e.to_string())?;
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(vars: &[(&'static str, String)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn every_option_a_deployment_sets_round_trips() {
        let mut options = ProjectionOptions {
            partitions: 7,
            batch_size: 123,
            handler_timeout: Duration::from_millis(2500),
            subscription: Some(Subscription::all().with_event_types(["A", "B"])),
            ..ProjectionOptions::default()
        };
        options.retry.max_retries = 5;
        let vars = to_vars(&options);
        let back = from_vars(ProjectionOptions::default(), lookup(&vars)).unwrap();
        assert_eq!(
            (
                back.partitions,
                back.batch_size,
                back.retry.max_retries,
                back.handler_timeout,
                back.subscription
            ),
            (7, 123, 5, Duration::from_millis(2500), options.subscription)
        );
    }

    #[test]
    fn no_variables_change_nothing_and_bad_ones_are_named() {
        let base = ProjectionOptions::default();
        let same = from_vars(base.clone(), |_| None).unwrap();
        assert_eq!(same.partitions, base.partitions);
        let bad = from_vars(base.clone(), |n| {
            (n == BATCH_SIZE).then(|| "many".to_owned())
        });
        assert_eq!(
            bad.unwrap_err(),
            "CHRONICLE_BATCH_SIZE is `many`, not a whole number"
        );
        let zero = from_vars(base, |n| (n == PARTITIONS).then(|| "0".to_owned()));
        assert!(zero.unwrap_err().contains("partitions"));
    }
}
