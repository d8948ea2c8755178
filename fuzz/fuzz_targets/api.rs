//! The operator API's JSON request bodies, as the server parses them
//! (`POST /api/v1/devices`, `/devices/batch`, `/deployments`), and the
//! error body both the API and the device endpoint send.
//!
//! Properties: parsing never panics, and a body that parses survives
//! serialise → parse unchanged (the CLI's requests are what the server
//! reads).
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use otter_proto::api::{BatchEnrollRequest, CreateDeployment, EnrollRequest, ErrorBody};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    if let Ok(body) = serde_json::from_slice::<T>(data) {
        let json = serde_json::to_vec(&body).expect("API bodies serialise");
        assert_eq!(
            serde_json::from_slice::<T>(&json).ok().as_ref(),
            Some(&body),
            "a {} does not survive serialise → parse",
            std::any::type_name::<T>()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    round_trips::<EnrollRequest>(data);
    round_trips::<BatchEnrollRequest>(data);
    round_trips::<CreateDeployment>(data);
    round_trips::<ErrorBody>(data);
});
