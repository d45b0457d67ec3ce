//! Every decoder of stored bytes, fed arbitrary input: none may panic, and
//! whatever decodes must re-encode to exactly the same bytes (one id, one
//! encoding).
#![no_main]

use dsv_store::id::{hash, ChunkId, DraftId};
use dsv_store::object::{stored, Object};
use dsv_store::schema::{ChunkLoc, DraftRecord, StatEntry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(obj) = Object::decode(data, "fuzz") {
        assert_eq!(obj.encode(), data, "decoded object re-encodes differently");
    }
    if let Ok(canonical) = stored::unwrap(data, "fuzz") {
        let _ = Object::decode(&canonical, "fuzz");
    }
    let id = ChunkId(hash(b"fuzz"));
    if let Ok(loc) = ChunkLoc::decode(data, &id) {
        assert_eq!(loc.encode(), data);
    }
    if let Ok(s) = StatEntry::decode(data) {
        assert_eq!(s.encode(), data);
    }
    if let Ok(d) = DraftRecord::decode(data, &DraftId(hash(b"fuzz"))) {
        assert_eq!(d.encode(), data);
    }
    if let Ok(records) = dsv_store::pack::parse_pack(data, "fuzz") {
        for r in records {
            let _ = dsv_store::compress::decode_chunk(&r.id, r.codec, r.data, r.raw_len);
        }
    }
});
