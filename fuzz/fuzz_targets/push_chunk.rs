//! Push mode's binary chunks, as a device decodes them from its `chunk`
//! topic.
//!
//! Properties: decoding never panics and never yields more than
//! `MAX_CHUNK_BYTES` of data; the format is canonical (a decoded chunk
//! encodes back to exactly its input, so the offset a device acknowledges is
//! the one the server sent); and any chunk the server can build decodes to
//! itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otter_proto::push::{MAX_CHUNK_BYTES, PushChunk};

fuzz_target!(|data: &[u8]| {
    if let Ok(chunk) = PushChunk::decode(data) {
        assert!(chunk.data.len() <= MAX_CHUNK_BYTES);
        assert_eq!(
            chunk.encode(),
            data,
            "decoded {chunk:?} encodes differently"
        );
    }

    // The same bytes read as fields: id length, id, offset, data.
    let Some((&id_length, rest)) = data.split_first() else {
        return;
    };
    let (id, rest) = rest.split_at(usize::from(id_length).min(rest.len()));
    let (Ok(deployment_id), Some((offset, payload))) =
        (std::str::from_utf8(id), rest.split_first_chunk::<8>())
    else {
        return;
    };
    let chunk = PushChunk {
        deployment_id,
        offset: u64::from_be_bytes(*offset),
        data: payload,
    };
    assert_eq!(PushChunk::decode(&chunk.encode()), Ok(chunk));
});
