//! The admin API's schemas: exact, as the handlers write every field.

use serde_json::{json, Value};

use super::{
    array, exact, int, nullable, nullable_unix_ms, r, request, string, totals, unix_ms, usd,
    user_ref,
};

pub(super) fn admin_schemas() -> Vec<(&'static str, Value)> {
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
