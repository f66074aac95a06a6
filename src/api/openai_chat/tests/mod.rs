//! Tests of the OpenAI chat wire, through the public functions only.

mod request;
mod response;
mod stream;
