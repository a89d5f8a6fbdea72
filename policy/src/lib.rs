pub mod clock;
pub mod identity;
pub mod ntlm;
pub mod relay;
