//! The model APIs' schemas: their top-level fields and the required ones.

use serde_json::{json, Value};

use super::{array, exact, int, nullable, request, string};

pub(super) fn model_schemas() -> Vec<(&'static str, Value)> {
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
