//! Every message a device or the server decodes from the network: JSON
//! messages, manifests, topics, push chunks. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otter_proto::messages::{
    PollResponse, PushAck, Registration, ServerMessage, StatusReport, decode,
};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Registration>(data);
    let _ = decode::<StatusReport>(data);
    let _ = decode::<ServerMessage>(data);
    let _ = decode::<PushAck>(data);
    let _ = decode::<PollResponse>(data);
    let _ = otter_proto::push::PushChunk::decode(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = otter_proto::manifest::Manifest::from_json(text);
        let _ = otter_proto::topics::parse_device_topic(text);
        let _ = otter_proto::api::Target::parse(text);
        let _ = otter_proto::manifest::parse_release_id(text);
    }
});
