//! Table definitions shared by both backends (timestamps are unix milliseconds, money is
//! integer micro-dollars, so the two dialects agree on every type).

diesel::table! {
    users (id) {
        id -> BigInt,
        external_id -> Text,
        name -> Nullable<Text>,
        auth_method -> Text,
        service_type -> Nullable<Text>,
        blocked -> Bool,
        blocked_reason -> Nullable<Text>,
        blocked_at -> Nullable<BigInt>,
        created_at -> BigInt,
    }
}

diesel::table! {
    api_keys (id) {
        id -> BigInt,
        user_id -> BigInt,
        name -> Nullable<Text>,
        key_hash -> Text,
        hint -> Text,
        source -> Text,
        created_at -> BigInt,
        expires_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    usage_ledger (id) {
        id -> BigInt,
        request_id -> Text,
        user_id -> Nullable<BigInt>,
        key_id -> Nullable<BigInt>,
        protocol -> Text,
        requested_model -> Text,
        resolved_model -> Nullable<Text>,
        service_type -> Nullable<Text>,
        purpose -> Nullable<Text>,
        stream -> Bool,
        outcome -> Text,
        reason -> Text,
        prompt_tokens -> BigInt,
        completion_tokens -> BigInt,
        cost_micros -> BigInt,
        started_at -> BigInt,
        finished_at -> BigInt,
        api -> Text,
    }
}

diesel::joinable!(api_keys -> users (user_id));
diesel::allow_tables_to_appear_in_same_query!(users, api_keys, usage_ledger);

diesel::table! {
    budgets (id) {
        id -> BigInt,
        scope -> Text,
        subject_id -> BigInt,
        explicit -> Bool,
        limit_micros -> BigInt,
        period -> Text,
        period_start -> BigInt,
        spent_micros -> BigInt,
        reserved_micros -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    budget_reservations (id, budget_id) {
        id -> Text,
        budget_id -> BigInt,
        request_id -> Text,
        amount_micros -> BigInt,
        created_at -> BigInt,
        expires_at -> BigInt,
    }
}

diesel::table! {
    rate_limits (scope, subject_id) {
        scope -> Text,
        subject_id -> BigInt,
        rpm -> Nullable<BigInt>,
        tpm -> Nullable<BigInt>,
        updated_at -> BigInt,
    }
}

diesel::joinable!(budget_reservations -> budgets (budget_id));
diesel::allow_tables_to_appear_in_same_query!(budgets, budget_reservations, rate_limits);
