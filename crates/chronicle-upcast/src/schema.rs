//! JSON Schema validation of transformed events (feature `json-schema`).

use serde_json::Value;

use crate::SchemaIssue;
use crate::pointer::is_opaque;

/// A compiled JSON Schema.
#[derive(Debug)]
pub(crate) struct CompiledSchema {
    #[cfg(feature = "json-schema")]
    validator: jsonschema::Validator,
}

impl CompiledSchema {
    /// Compiles `schema`; the error says what is wrong with it.
    #[cfg(feature = "json-schema")]
    pub(crate) fn compile(schema: &Value) -> Result<Self, String> {
        jsonschema::validator_for(schema)
            .map(|validator| CompiledSchema { validator })
            .map_err(|e| format!("invalid JSON Schema: {e}"))
    }

    /// Without the `json-schema` feature, schemas cannot be used.
    #[cfg(not(feature = "json-schema"))]
    pub(crate) fn compile(_schema: &Value) -> Result<Self, String> {
        Err("JSON Schema validation needs the `json-schema` feature of chronicle-upcast; enable it or remove the schema".to_owned())
    }

    /// Every way `data` does not match, except inside encrypted envelopes
    /// and redaction markers, whose shape the schema cannot know.
    #[cfg(feature = "json-schema")]
    pub(crate) fn issues(&self, data: &Value) -> Vec<SchemaIssue> {
        self.validator
            .iter_errors(data)
            .filter_map(|e| {
                let pointer = e.instance_path().as_str().to_owned();
                (!inside_opaque(data, &pointer)).then(|| SchemaIssue {
                    message: e.masked().to_string(),
                    pointer,
                })
            })
            .collect()
    }

    #[cfg(not(feature = "json-schema"))]
    pub(crate) fn issues(&self, _data: &Value) -> Vec<SchemaIssue> {
        Vec::new()
    }
}

/// Whether `pointer` is at or inside an opaque value of `data`.
#[cfg_attr(not(feature = "json-schema"), allow(dead_code))]
fn inside_opaque(data: &Value, pointer: &str) -> bool {
    let mut end = 0;
    loop {
        let prefix = &pointer[..end];
        match data.pointer(prefix) {
            Some(v) if is_opaque(v) => return true,
            Some(_) => {}
            None => return false,
        }
        if end == pointer.len() {
            return false;
        }
        end = pointer[end + 1..]
            .find('/')
            .map_or(pointer.len(), |i| end + 1 + i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_opaque_ancestors() {
        let data = json!({ "a": { "$enc": "v1" }, "b": { "c": 1 } });
        assert!(inside_opaque(&data, "/a"));
        assert!(inside_opaque(&data, "/a/x"));
        assert!(!inside_opaque(&data, "/b/c"));
        assert!(!inside_opaque(&data, ""));
    }

    #[cfg(feature = "json-schema")]
    #[test]
    fn reports_masked_issues_outside_envelopes() {
        let schema = CompiledSchema::compile(&json!({
            "type": "object",
            "properties": { "email": { "type": "string" }, "age": { "type": "integer" } }
        }))
        .unwrap();
        let issues = schema.issues(&json!({ "email": { "$enc": "v1" }, "age": "secret-ish" }));
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].pointer, "/age");
        assert!(
            !issues[0].message.contains("secret-ish"),
            "{}",
            issues[0].message
        );
        assert!(CompiledSchema::compile(&json!({ "type": 5 })).is_err());
    }
}
