pub mod clock;
pub mod identity;
pub mod located;
pub mod ntlm;
pub mod relay;
