//! Every JSON message a device or the server decodes: `Registration`,
//! `StatusReport` and `PushAck` (server, from MQTT and `POST /v1/poll`,
//! `POST /v1/status`), `ServerMessage` (device, from `notify`) and
//! `PollResponse` (device, from the poll answer).
//!
//! Properties: `decode` never panics, and a message it accepts survives
//! `encode` → `decode` unchanged, so what one side sends is what the other
//! reads.
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use otter_proto::messages::{
    PollResponse, PushAck, Registration, ServerMessage, StatusReport, decode, encode,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    if let Ok(message) = decode::<T>(data) {
        assert_eq!(
            decode::<T>(&encode(&message)).as_ref(),
            Ok(&message),
            "a {} does not survive encode → decode",
            std::any::type_name::<T>()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    round_trips::<Registration>(data);
    round_trips::<StatusReport>(data);
    round_trips::<PushAck>(data);
    round_trips::<ServerMessage>(data);
    round_trips::<PollResponse>(data);
});
