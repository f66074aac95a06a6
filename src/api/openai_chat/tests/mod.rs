//! Tests of the OpenAI chat wire, through the public functions only.

mod plain_request;
mod request;
mod response;
mod stream;
