//! `/register` and `/node` bodies: decode as the server does, then validate; never panic.
#![no_main]

use bootsync::cfgsync::NodeRegistration;
use bootsync::server::nodes::validate_registration;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(registration) = serde_json::from_slice::<NodeRegistration>(data) {
        if validate_registration(&registration).is_ok() {
            // What passes validation round-trips: it is stored and served as JSON.
            let again = serde_json::to_vec(&registration).expect("a registration serialises");
            let back: NodeRegistration = serde_json::from_slice(&again).expect("and decodes");
            assert_eq!(back, registration);
        }
    }
});
