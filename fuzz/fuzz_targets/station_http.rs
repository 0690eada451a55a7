//! What the site answers a station: the HTTP/1.1 answer parser takes any bytes, never
//! panics, never claims more bytes than it was given, and never takes a body past its
//! bound.
#![no_main]
use keyfab_station::http::{parse_response, MAX_BODY_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((response, used))) = parse_response(data) {
        assert!(used <= data.len());
        assert!(response.body.len() <= MAX_BODY_BYTES);
        assert!(response.status >= 200);
        // An answer is whole: the same bytes with more after them give the same answer.
        let mut longer = data[..used].to_vec();
        longer.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let (again, used_again) = parse_response(&longer).unwrap().unwrap();
        assert_eq!(used_again, used);
        assert_eq!(again.body.as_slice(), response.body.as_slice());
    }
});
