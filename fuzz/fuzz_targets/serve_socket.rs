//! What a process sends on a serving site's socket (`HOME/serve.sock`, docs/FORMATS.md
//! §11): any bytes are read as a bounded frame and decoded strictly, and a store call
//! that decodes runs against a real embedded store without panicking — a table byte out
//! of range or a guard that fails is an answer, not a crash.
#![no_main]
use keyfab_node::socket_store::{read_frame, unframe, Opening, StoreCall, MAX_CLIENT_FRAME};
use keyfab_site::server::admin::AdminRequest;
use keyfab_store::EmbeddedStore;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static STORE: OnceLock<EmbeddedStore> = OnceLock::new();
    let store = STORE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("keyfab-fuzz-{}.redb", std::process::id()));
        let _ = std::fs::remove_file(&path);
        EmbeddedStore::open(&path).expect("store")
    });
    let mut wire = std::io::Cursor::new(data);
    let Ok(body) = read_frame(&mut wire, MAX_CLIENT_FRAME) else {
        return;
    };
    let _ = unframe::<Opening<AdminRequest>>(&body);
    if let Ok(call) = unframe::<StoreCall>(&body) {
        // A hold only reaches a lent store's gate; the embedded one has none.
        let _ = call.run(store);
    }
});
