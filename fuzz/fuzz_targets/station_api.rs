//! What a station sends the site: request bodies are parsed strictly, whatever the
//! bytes. (The site's socket has its own target, `serve_socket`.)
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = keyfab_site::server::api::parse_provision(data, "line-1") {
        assert_eq!(req.station.as_deref(), Some("line-1"));
    }
    let _ = keyfab_site::server::api::parse_confirm(data);
});
