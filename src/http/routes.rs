//! The HTTP route table: every route the router serves, with what the OpenAPI document says of
//! it. The router (`super::router`) and `GET /openapi.json` (`super::openapi`) are both built
//! from this one table, so a route cannot be served without being documented.

use std::sync::Arc;

use axum::handler::Handler;
use axum::routing::{on, MethodFilter, MethodRouter};
use http::Method;

use super::{admin, authorize, budgets, chat, embeddings, messages, ops, responses};
use crate::core::Gateway;

/// One method on one path: its handler and its documentation.
pub struct Route {
    pub method: Method,
    /// axum's path syntax, which is also OpenAPI's: `/admin/users/{id}`.
    pub path: &'static str,
    pub handler: MethodRouter<Arc<Gateway>>,
    pub doc: Doc,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Anyone.
    Public,
    /// A caller credential: an API key or a token (`Authorization: Bearer`; the Messages API
    /// also takes `x-api-key`).
    Caller,
    /// The admin token (`Authorization: Bearer <server.admin_token>`).
    Admin,
}

/// The group a route is listed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    Models,
    Admin,
    Operations,
}

impl Tag {
    /// The tag's name in the document.
    pub fn as_str(self) -> &'static str {
        match self {
            Tag::Models => "models",
            Tag::Admin => "admin",
            Tag::Operations => "operations",
        }
    }
}

/// The shape errors of a route answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// `{"error": {"message", "type", "code", "param"}}`.
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`.
    Anthropic,
    /// The OpenAI shape with `type: admin_error`.
    Admin,
    /// Plain text (the operational probes).
    None,
}

/// What a successful answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A JSON body of the named schema.
    Json(&'static str),
    /// A JSON body, or server-sent events when the request asks for `"stream": true`.
    JsonOrEvents(&'static str),
    /// Plain text.
    Text,
    /// A Prometheus/OpenMetrics exposition.
    OpenMetrics,
}

/// Where a parameter is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum In {
    Path,
    Query,
}

/// A path or query parameter.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    pub location: In,
    /// A JSON Schema `type`: `integer` or `string`.
    pub ty: &'static str,
    pub required: bool,
    pub description: &'static str,
}

const fn path(name: &'static str, ty: &'static str, description: &'static str) -> Param {
    Param {
        name,
        location: In::Path,
        ty,
        required: true,
        description,
    }
}

const fn query(
    name: &'static str,
    ty: &'static str,
    required: bool,
    description: &'static str,
) -> Param {
    Param {
        name,
        location: In::Query,
        ty,
        required,
        description,
    }
}

/// What the document says of a route.
#[derive(Debug, Clone)]
pub struct Doc {
    pub operation_id: &'static str,
    pub summary: &'static str,
    pub tag: Tag,
    pub auth: Auth,
    pub params: Vec<Param>,
    /// The request body's schema, and whether it may be left out.
    pub body: Option<(&'static str, bool)>,
    /// The success status and what it carries.
    pub ok: (u16, Answer),
    pub errors: ErrorShape,
}

impl Doc {
    fn new(operation_id: &'static str, summary: &'static str, tag: Tag) -> Self {
        let (auth, errors) = match tag {
            Tag::Models => (Auth::Caller, ErrorShape::OpenAi),
            Tag::Admin => (Auth::Admin, ErrorShape::Admin),
            Tag::Operations => (Auth::Public, ErrorShape::None),
        };
        Doc {
            operation_id,
            summary,
            tag,
            auth,
            params: Vec::new(),
            body: None,
            ok: (200, Answer::Text),
            errors,
        }
    }

    fn errors(mut self, errors: ErrorShape) -> Self {
        self.errors = errors;
        self
    }

    fn params<const N: usize>(mut self, params: [Param; N]) -> Self {
        self.params = params.into();
        self
    }

    fn body(mut self, schema: &'static str) -> Self {
        self.body = Some((schema, false));
        self
    }

    fn optional_body(mut self, schema: &'static str) -> Self {
        self.body = Some((schema, true));
        self
    }

    fn ok(mut self, status: u16, answer: Answer) -> Self {
        self.ok = (status, answer);
        self
    }
}

fn route<H, T>(method: Method, path: &'static str, handler: H, doc: Doc) -> Route
where
    H: Handler<T, Arc<Gateway>>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a method axum routes");
    Route {
        method,
        path,
        handler: on(filter, handler),
        doc,
    }
}

const USER_REF: &str = "A numeric user id or, failing that, an external id";

/// Every route the HTTP server serves.
pub fn table() -> Vec<Route> {
    use Answer::{Json, JsonOrEvents, OpenMetrics};
    use Method as M;
    use Tag::{Admin, Models, Operations};
    vec![
        // The model APIs.
        route(
            M::POST,
            "/v1/chat/completions",
            chat::chat_completions,
            Doc::new("createChatCompletion", "OpenAI chat completion", Models)
                .body("ChatCompletionRequest")
                .ok(200, JsonOrEvents("ChatCompletion")),
        ),
        route(
            M::POST,
            "/v1/messages",
            messages::messages,
            Doc::new("createMessage", "Anthropic Messages", Models)
                .errors(ErrorShape::Anthropic)
                .body("MessagesRequest")
                .ok(200, JsonOrEvents("Message")),
        ),
        route(
            M::POST,
            "/v1/messages/count_tokens",
            messages::count_tokens,
            Doc::new(
                "countMessageTokens",
                "Anthropic token count of a Messages body",
                Models,
            )
            .errors(ErrorShape::Anthropic)
            .body("MessagesRequest")
            .ok(200, Json("TokenCount")),
        ),
        route(
            M::POST,
            "/v1/responses",
            responses::responses,
            Doc::new("createResponse", "OpenAI Responses", Models)
                .body("ResponsesRequest")
                .ok(200, JsonOrEvents("Response")),
        ),
        route(
            M::POST,
            "/v1/embeddings",
            embeddings::embeddings,
            Doc::new("createEmbedding", "OpenAI embeddings", Models)
                .body("EmbeddingsRequest")
                .ok(200, Json("EmbeddingList")),
        ),
        route(
            M::GET,
            "/v1/models",
            ops::models,
            Doc::new(
                "listModels",
                "The models and aliases this caller may use",
                Models,
            )
            .ok(200, Json("ModelList")),
        ),
        route(
            M::POST,
            "/v1/authorize",
            authorize::authorize,
            Doc::new(
                "authorize",
                "Check a credential (and a model) without calling a model",
                Models,
            )
            .optional_body("AuthorizeRequest")
            .ok(200, Json("Principal")),
        ),
        // Operational routes.
        route(
            M::GET,
            "/healthz",
            ops::healthz,
            Doc::new("healthz", "Liveness: the process is up", Operations),
        ),
        route(
            M::GET,
            "/readyz",
            ops::readyz,
            Doc::new(
                "readyz",
                "Readiness: the store answers and a configuration is loaded (503 when not)",
                Operations,
            ),
        ),
        route(
            M::GET,
            "/metrics",
            ops::metrics,
            Doc::new(
                "metrics",
                "Prometheus metrics (OpenMetrics text)",
                Operations,
            )
            .ok(200, OpenMetrics),
        ),
        route(
            M::GET,
            "/openapi.json",
            super::openapi::serve,
            Doc::new("openapi", "This document", Operations).ok(200, Json("OpenApiDocument")),
        ),
        route(
            M::GET,
            "/v1/health",
            admin::health,
            Doc::new(
                "providerHealth",
                "Each provider's health and upstream key pool (hints only)",
                Operations,
            )
            .ok(200, Json("ProviderHealth")),
        ),
        route(
            M::GET,
            "/v1/aliases",
            admin::aliases,
            Doc::new(
                "listAliases",
                "Each alias with its description and chain",
                Operations,
            )
            .ok(200, Json("AliasList")),
        ),
        // The admin API.
        route(
            M::POST,
            "/admin/users",
            admin::create_user,
            Doc::new("createUser", "Create a user", Admin)
                .body("CreateUser")
                .ok(201, Json("User")),
        ),
        route(
            M::GET,
            "/admin/users",
            admin::find_user,
            Doc::new(
                "listUsers",
                "One user by external id, or a page of users in id order",
                Admin,
            )
            .params([
                query(
                    "external_id",
                    "string",
                    false,
                    "Answer this one user (a User, not a list)",
                ),
                query(
                    "after_id",
                    "integer",
                    false,
                    "Users with an id above this (default 0)",
                ),
                query(
                    "limit",
                    "integer",
                    false,
                    "At most this many (default 100, at most 1000)",
                ),
            ])
            .ok(200, Json("UserOrUserList")),
        ),
        route(
            M::GET,
            "/admin/users/{id}",
            admin::get_user,
            Doc::new("getUser", "A user", Admin)
                .params([path("id", "string", USER_REF)])
                .ok(200, Json("User")),
        ),
        route(
            M::POST,
            "/admin/users/{id}/block",
            admin::block_user,
            Doc::new(
                "blockUser",
                "Block a user; their requests fail with `blocked`",
                Admin,
            )
            .params([path("id", "string", USER_REF)])
            .optional_body("BlockUser")
            .ok(200, Json("User")),
        ),
        route(
            M::POST,
            "/admin/users/{id}/unblock",
            admin::unblock_user,
            Doc::new("unblockUser", "Lift a user's block", Admin)
                .params([path("id", "string", USER_REF)])
                .ok(200, Json("User")),
        ),
        route(
            M::GET,
            "/admin/signup-cap",
            admin::signup_cap,
            Doc::new(
                "signupCaps",
                "Each service type's signup caps and their use",
                Admin,
            )
            .ok(200, Json("SignupCaps")),
        ),
        route(
            M::POST,
            "/admin/keys",
            admin::create_key,
            Doc::new(
                "createKey",
                "Create an API key for a user; the key is answered once",
                Admin,
            )
            .body("CreateKey")
            .ok(201, Json("CreatedKey")),
        ),
        route(
            M::GET,
            "/admin/keys",
            admin::list_keys,
            Doc::new("listKeys", "A user's API keys (hints only)", Admin)
                .params([query("user_id", "string", true, USER_REF)])
                .ok(200, Json("KeyList")),
        ),
        route(
            M::DELETE,
            "/admin/keys/{id}",
            admin::revoke_key,
            Doc::new("revokeKey", "Revoke an API key; refused at once", Admin)
                .params([path("id", "integer", "The key id")])
                .ok(200, Json("ApiKeyInfo")),
        ),
        route(
            M::GET,
            "/admin/upstream-keys",
            admin::upstream_keys,
            Doc::new(
                "upstreamKeys",
                "Each provider's health and upstream key pool (hints only)",
                Admin,
            )
            .ok(200, Json("ProviderHealth")),
        ),
        route(
            M::POST,
            "/admin/reload",
            admin::reload,
            Doc::new("reload", "Reload the configuration file", Admin).ok(200, Json("Reloaded")),
        ),
        route(
            M::POST,
            "/admin/providers/{provider}/keys/{hint}/enable",
            admin::enable_upstream_key,
            Doc::new(
                "enableUpstreamKey",
                "Put a disabled upstream key back in its pool",
                Admin,
            )
            .params([
                path(
                    "provider",
                    "string",
                    "The provider's name in the configuration",
                ),
                path(
                    "hint",
                    "string",
                    "The key's hint, as listed by /admin/upstream-keys",
                ),
            ])
            .ok(200, Json("Enabled")),
        ),
        route(
            M::GET,
            "/admin/budgets",
            budgets::get_budget,
            Doc::new(
                "getBudget",
                "A user's or an API key's budget (current period) and rate limits",
                Admin,
            )
            .params([
                query("scope", "string", true, "`user` or `key`"),
                query(
                    "id",
                    "string",
                    true,
                    "The key id, or for a user a numeric id or an external id",
                ),
            ])
            .ok(200, Json("Budget")),
        ),
        route(
            M::PUT,
            "/admin/budgets",
            budgets::put_budget,
            Doc::new(
                "putBudget",
                "Replace a user's or an API key's own budget and rate limits",
                Admin,
            )
            .body("PutBudget")
            .ok(200, Json("Budget")),
        ),
        route(
            M::GET,
            "/admin/usage",
            budgets::usage,
            Doc::new(
                "usage",
                "Spend and tokens per resolved model from the usage ledger",
                Admin,
            )
            .params([
                query("user_id", "string", false, USER_REF),
                query("key_id", "integer", false, "The key id"),
                query("model", "string", false, "The resolved model"),
                query(
                    "from",
                    "string",
                    false,
                    "Requests that started at or after: unix ms, YYYY-MM-DD or RFC 3339 UTC",
                ),
                query(
                    "to",
                    "string",
                    false,
                    "Requests that started before: unix ms, YYYY-MM-DD or RFC 3339 UTC",
                ),
            ])
            .ok(200, Json("Usage")),
        ),
    ]
}
