//! The document's schemas, each written once. The admin API's are exact (the unit tests hold
//! them to the handlers' JSON); the model APIs' name their top-level fields and the required
//! ones, as the upstream APIs define the rest.

mod admin;
mod models;

use serde_json::{json, Map, Value};

use admin::admin_schemas;
use models::model_schemas;

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn nullable(ty: &str) -> Value {
    json!({"type": [ty, "null"]})
}

fn int() -> Value {
    json!({"type": "integer", "format": "int64"})
}

fn string() -> Value {
    json!({"type": "string"})
}

fn unix_ms(description: &str) -> Value {
    json!({"type": "integer", "format": "int64", "description": description})
}

fn nullable_unix_ms(description: &str) -> Value {
    json!({"type": ["integer", "null"], "format": "int64", "description": description})
}

fn usd(description: &str) -> Value {
    json!({"type": "string", "description": description, "examples": ["1.500000"]})
}

fn array(items: Value) -> Value {
    json!({"type": "array", "items": items})
}

/// An object whose every listed field is present (the admin API always writes each field,
/// `null` when absent).
fn exact(description: &str, fields: Vec<(&str, Value)>) -> Value {
    let required: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    let properties: Map<String, Value> = fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    json!({
        "type": "object",
        "description": description,
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

/// A request object: `required` fields must be given, the others may be.
fn request(description: &str, required: &[&str], fields: Vec<(&str, Value)>, open: bool) -> Value {
    let properties: Map<String, Value> = fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    json!({
        "type": "object",
        "description": description,
        "properties": properties,
        "required": required,
        "additionalProperties": open,
    })
}

fn user_ref() -> Value {
    json!({
        "type": ["integer", "string"],
        "description": "A numeric user id or, failing that, an external id",
    })
}

fn totals(description: &str, model: bool) -> Value {
    let mut fields = vec![
        ("requests", int()),
        ("prompt_tokens", int()),
        ("completion_tokens", int()),
        ("cost_micros", int()),
        ("spend_usd", usd("cost_micros in USD")),
    ];
    if model {
        fields.insert(0, ("model", string()));
    }
    exact(description, fields)
}

/// Every schema by name.
pub fn all() -> Map<String, Value> {
    admin_schemas()
        .into_iter()
        .chain(model_schemas())
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}
