//! Bounce and unsubscribe handling: getting mails in and out of mail stores.
pub mod mailbox;
