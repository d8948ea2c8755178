//! The agent's state files, read back at every start: `job.json`,
//! `installed.json` and `self-update.json` (a crash or a full disk can
//! leave anything in them).
//!
//! Properties: parsing never panics, and whatever parses survives the
//! agent's own write (pretty JSON) → read unchanged, so a restart resumes
//! exactly the job, versions and self-update step it saved.
#![no_main]

use std::collections::BTreeMap;
use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use otter_agent::self_update::Marker;
use otter_proto::job::Job;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(data) {
        let written = serde_json::to_vec_pretty(&value).expect("state values serialise");
        assert_eq!(
            serde_json::from_slice::<T>(&written).ok().as_ref(),
            Some(&value),
            "a {} does not survive write → read",
            std::any::type_name::<T>()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    round_trips::<Job>(data);
    round_trips::<BTreeMap<String, semver::Version>>(data);
    round_trips::<Marker>(data);
});
