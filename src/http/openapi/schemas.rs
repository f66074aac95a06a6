//! The document's schemas, each written once. The admin API's are exact (the unit tests hold
//! them to the handlers' JSON); the model APIs' name their top-level fields and the required
//! ones, as the upstream APIs define the rest.

use serde_json::{json, Map, Value};

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

fn admin_schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "AdminError",
            json!({
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["message", "type", "code"],
                        "properties": {
                            "message": string(),
                            "type": {"const": "admin_error"},
                            "code": {"enum": ["auth_rejected", "admin_disabled", "not_found", "conflict", "invalid_request", "store_unavailable"]},
                            "param": nullable("string"),
                        },
                    },
                },
            }),
        ),
        (
            "User",
            exact(
                "A user",
                vec![
                    ("id", int()),
                    ("external_id", string()),
                    ("name", nullable("string")),
                    ("auth_method", string()),
                    ("blocked", json!({"type": "boolean"})),
                    ("blocked_reason", nullable("string")),
                    ("blocked_at", nullable_unix_ms("Unix ms of the block")),
                    ("created_at", unix_ms("Unix ms")),
                    ("service_type", nullable("string")),
                ],
            ),
        ),
        (
            "UserList",
            exact("A page of users", vec![("users", array(r("User")))]),
        ),
        (
            "UserOrUserList",
            json!({"oneOf": [r("User"), r("UserList")], "description": "A User with `external_id`, else a UserList"}),
        ),
        (
            "CreateUser",
            request(
                "A new user",
                &["external_id"],
                vec![("external_id", string()), ("name", nullable("string"))],
                true,
            ),
        ),
        (
            "BlockUser",
            request(
                "Why (optional; a default reason without it)",
                &[],
                vec![("reason", string())],
                true,
            ),
        ),
        (
            "ApiKeyInfo",
            exact(
                "An API key (its hint only)",
                vec![
                    ("id", int()),
                    ("user_id", int()),
                    ("name", nullable("string")),
                    ("hint", string()),
                    ("source", string()),
                    ("created_at", unix_ms("Unix ms")),
                    ("expires_at", nullable_unix_ms("Unix ms")),
                    ("revoked_at", nullable_unix_ms("Unix ms")),
                ],
            ),
        ),
        (
            "KeyList",
            exact("A user's keys", vec![("data", array(r("ApiKeyInfo")))]),
        ),
        (
            "CreateKey",
            request(
                "A new key for a user",
                &["user_id"],
                vec![
                    ("user_id", user_ref()),
                    ("name", nullable("string")),
                    (
                        "expires_at",
                        nullable_unix_ms("Unix ms after which it is refused"),
                    ),
                ],
                true,
            ),
        ),
        (
            "CreatedKey",
            exact(
                "A key just created: `key` is shown this once",
                vec![("id", int()), ("key", string()), ("hint", string())],
            ),
        ),
        (
            "SignupCaps",
            exact(
                "Signup caps per service type",
                vec![(
                    "service_types",
                    array(exact(
                        "A service type's caps and their use",
                        vec![
                            ("service_type", string()),
                            ("cap_per_day", nullable("integer")),
                            ("used_24h", int()),
                            ("cap_total", nullable("integer")),
                            ("used_total", int()),
                            ("remaining", nullable("integer")),
                        ],
                    )),
                )],
            ),
        ),
        (
            "ProviderHealth",
            exact(
                "Each provider's health and key pool",
                vec![(
                    "providers",
                    array(exact(
                        "A provider",
                        vec![
                            ("provider", string()),
                            ("healthy", json!({"type": "boolean"})),
                            ("consecutive_failures", json!({"type": "integer"})),
                            ("last_error", nullable("string")),
                            ("unhealthy_until_ms", nullable_unix_ms("Unix ms")),
                            (
                                "keys",
                                array(exact(
                                    "An upstream key",
                                    vec![
                                        ("hint", string()),
                                        (
                                            "state",
                                            json!({"enum": ["valid", "temporary", "permanent"]}),
                                        ),
                                        (
                                            "reason",
                                            json!({"enum": ["rate_limited", "unauthorized", "forbidden", null]}),
                                        ),
                                        ("cooldown_until_ms", nullable_unix_ms("Unix ms")),
                                    ],
                                )),
                            ),
                        ],
                    )),
                )],
            ),
        ),
        (
            "Reloaded",
            exact("Reloaded", vec![("reloaded", json!({"const": true}))]),
        ),
        (
            "Enabled",
            exact(
                "How many keys were enabled",
                vec![("enabled", json!({"type": "integer"}))],
            ),
        ),
        (
            "Budget",
            exact(
                "A scope's budget in its current period, and its rate limits",
                vec![
                    ("scope", json!({"enum": ["user", "key"]})),
                    ("id", int()),
                    (
                        "explicit",
                        json!({"type": "boolean", "description": "Set through the admin API (else the service type's default, as last applied)"}),
                    ),
                    (
                        "limit_usd",
                        json!({"type": ["string", "null"], "description": "USD as a decimal string"}),
                    ),
                    ("limit_micros", nullable("integer")),
                    ("period", nullable("string")),
                    ("period_start", nullable_unix_ms("Unix ms")),
                    ("reset_at", nullable_unix_ms("Unix ms; null for `total`")),
                    ("reset_at_rfc3339", nullable("string")),
                    ("spent_usd", usd("USD as a decimal string")),
                    ("spent_micros", int()),
                    ("reserved_micros", int()),
                    ("leased_micros", int()),
                    (
                        "remaining_usd",
                        json!({"type": ["string", "null"], "description": "USD as a decimal string"}),
                    ),
                    ("remaining_micros", nullable("integer")),
                    ("rpm", nullable("integer")),
                    ("tpm", nullable("integer")),
                ],
            ),
        ),
        (
            "PutBudget",
            request(
                "Replaces the scope's own budget and rate limits",
                &["scope", "id"],
                vec![
                    ("scope", json!({"enum": ["user", "key"]})),
                    (
                        "id",
                        json!({"type": ["integer", "string"], "description": "The key id, or for a user a numeric id or an external id"}),
                    ),
                    (
                        "limit_usd",
                        json!({"type": ["number", "string", "null"], "description": "USD per period; left out or null removes the scope's own budget"}),
                    ),
                    (
                        "period",
                        json!({"type": ["string", "null"], "description": "daily, weekly, monthly (calendar, UTC), total, or a duration such as 12h"}),
                    ),
                    ("rpm", json!({"type": ["integer", "null"], "minimum": 1})),
                    ("tpm", json!({"type": ["integer", "null"], "minimum": 1})),
                ],
                false,
            ),
        ),
        (
            "Usage",
            exact(
                "Spend and tokens per resolved model, and their sum",
                vec![
                    ("user_id", nullable("integer")),
                    ("key_id", nullable("integer")),
                    ("model", nullable("string")),
                    ("from", nullable_unix_ms("Unix ms")),
                    ("to", nullable_unix_ms("Unix ms")),
                    ("models", array(totals("One resolved model", true))),
                    ("total", totals("The sum over the models", false)),
                ],
            ),
        ),
        (
            "AliasList",
            exact(
                "The configured aliases",
                vec![(
                    "data",
                    array(exact(
                        "An alias",
                        vec![
                            ("alias", string()),
                            ("description", string()),
                            ("chain", array(string())),
                        ],
                    )),
                )],
            ),
        ),
    ]
}

fn model_schemas() -> Vec<(&'static str, Value)> {
    let any = json!({});
    let object = json!({"type": "object"});
    let tokens = json!({"type": "integer", "minimum": 1});
    vec![
        (
            "OpenAIError",
            json!({
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["message", "type", "code"],
                        "properties": {
                            "message": string(),
                            "type": string(),
                            "code": {"type": "string", "description": "tollgate's reason, e.g. budget_exhausted, rate_limited, auth_rejected"},
                            "param": nullable("string"),
                        },
                    },
                },
            }),
        ),
        (
            "AnthropicError",
            json!({
                "type": "object",
                "required": ["type", "error"],
                "properties": {
                    "type": {"const": "error"},
                    "error": {
                        "type": "object",
                        "required": ["type", "message"],
                        "properties": {"type": string(), "message": string()},
                    },
                },
            }),
        ),
        (
            "ChatCompletionRequest",
            request(
                "An OpenAI chat completion request",
                &["model", "messages"],
                vec![
                    (
                        "model",
                        json!({"type": "string", "description": "A model or an alias"}),
                    ),
                    ("messages", array(object.clone())),
                    ("stream", json!({"type": "boolean"})),
                    ("stream_options", object.clone()),
                    ("max_tokens", tokens.clone()),
                    ("max_completion_tokens", tokens.clone()),
                    ("temperature", json!({"type": "number"})),
                    ("top_p", json!({"type": "number"})),
                    ("n", json!({"type": "integer"})),
                    ("stop", any.clone()),
                    ("tools", array(object.clone())),
                    ("tool_choice", any.clone()),
                    ("response_format", object.clone()),
                    ("user", string()),
                ],
                true,
            ),
        ),
        (
            "ChatCompletion",
            request(
                "An OpenAI chat completion",
                &["id", "object", "created", "model", "choices"],
                vec![
                    ("id", string()),
                    ("object", json!({"const": "chat.completion"})),
                    ("created", int()),
                    ("model", string()),
                    ("choices", array(object.clone())),
                    ("usage", object.clone()),
                ],
                true,
            ),
        ),
        (
            "MessagesRequest",
            request(
                "An Anthropic Messages request",
                &["model", "messages", "max_tokens"],
                vec![
                    (
                        "model",
                        json!({"type": "string", "description": "A model or an alias"}),
                    ),
                    ("messages", array(object.clone())),
                    ("max_tokens", tokens.clone()),
                    ("system", any.clone()),
                    ("stream", json!({"type": "boolean"})),
                    ("temperature", json!({"type": "number"})),
                    ("stop_sequences", array(string())),
                    ("tools", array(object.clone())),
                    ("tool_choice", object.clone()),
                    ("metadata", object.clone()),
                ],
                true,
            ),
        ),
        (
            "Message",
            request(
                "An Anthropic message",
                &["id", "type", "role", "content", "model"],
                vec![
                    ("id", string()),
                    ("type", json!({"const": "message"})),
                    ("role", json!({"const": "assistant"})),
                    ("content", array(object.clone())),
                    ("model", string()),
                    ("stop_reason", nullable("string")),
                    ("usage", object.clone()),
                ],
                true,
            ),
        ),
        (
            "TokenCount",
            exact(
                "The input tokens of a Messages body",
                vec![("input_tokens", json!({"type": "integer"}))],
            ),
        ),
        (
            "ResponsesRequest",
            request(
                "An OpenAI Responses request",
                &["model", "input"],
                vec![
                    (
                        "model",
                        json!({"type": "string", "description": "A model or an alias"}),
                    ),
                    ("input", json!({"type": ["string", "array"]})),
                    ("instructions", string()),
                    ("stream", json!({"type": "boolean"})),
                    ("max_output_tokens", tokens.clone()),
                    ("temperature", json!({"type": "number"})),
                    ("tools", array(object.clone())),
                ],
                true,
            ),
        ),
        (
            "Response",
            request(
                "An OpenAI response",
                &["id", "object", "status", "model", "output"],
                vec![
                    ("id", string()),
                    ("object", json!({"const": "response"})),
                    ("status", string()),
                    ("model", string()),
                    ("output", array(object.clone())),
                    ("usage", object.clone()),
                ],
                true,
            ),
        ),
        (
            "EmbeddingsRequest",
            request(
                "An OpenAI embeddings request",
                &["model", "input"],
                vec![
                    (
                        "model",
                        json!({"type": "string", "description": "A model or an alias"}),
                    ),
                    ("input", json!({"type": ["string", "array"]})),
                    ("encoding_format", json!({"enum": ["float", "base64"]})),
                    ("dimensions", json!({"type": "integer"})),
                    ("user", string()),
                ],
                true,
            ),
        ),
        (
            "EmbeddingList",
            request(
                "OpenAI embeddings",
                &["object", "data", "model"],
                vec![
                    ("object", json!({"const": "list"})),
                    ("data", array(object.clone())),
                    ("model", string()),
                    ("usage", object.clone()),
                ],
                true,
            ),
        ),
        (
            "ModelList",
            exact(
                "The models and aliases this caller may use, in OpenAI's list shape",
                vec![
                    ("object", json!({"const": "list"})),
                    (
                        "data",
                        array(exact(
                            "A model or an alias",
                            vec![
                                ("id", string()),
                                ("object", json!({"const": "model"})),
                                ("created", json!({"type": "integer"})),
                                ("owned_by", string()),
                                (
                                    "tollgate",
                                    exact(
                                        "What tollgate knows of it",
                                        vec![
                                            ("kind", json!({"enum": ["model", "alias"]})),
                                            ("description", string()),
                                            ("chain", array(string())),
                                            ("apis", array(string())),
                                        ],
                                    ),
                                ),
                            ],
                        )),
                    ),
                ],
            ),
        ),
        (
            "AuthorizeRequest",
            request(
                "Optionally, a model to check access to",
                &[],
                vec![("model", nullable("string"))],
                true,
            ),
        ),
        (
            "Principal",
            exact(
                "Who the credential is and what it may do",
                vec![
                    ("user_id", int()),
                    ("external_id", string()),
                    ("auth_method", string()),
                    ("service_type", string()),
                    ("purpose", nullable("string")),
                    ("allowed_models", array(string())),
                    ("key_id", nullable("integer")),
                    ("remaining_budget_micros", nullable("integer")),
                ],
            ),
        ),
        (
            "OpenApiDocument",
            json!({"type": "object", "description": "An OpenAPI 3.1 document", "required": ["openapi", "info", "paths"]}),
        ),
    ]
}

/// Every schema by name.
pub fn all() -> Map<String, Value> {
    admin_schemas()
        .into_iter()
        .chain(model_schemas())
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}
