//! The name registry: the classic store server, holding `Name → {remote_chan,Host,Port}`.
//!
//! ```text
//! register   store,Name,{remote_chan,{127,0,0,1},40123}\n   (no reply)
//!            lookup,Name\n  → {just,{remote_chan,{127,0,0,1},40123}}\n   (read back: now visible)
//! lookup     lookup,Name\n  → {just,{remote_chan,...}}\n | nothing\n
//! ```

use super::{Chan, ChanError, Node, Value};
use crate::framing::Framing;
use crate::store::client::StoreClient;
use std::net::ToSocketAddrs;

/// Registers `chan` under `name` in the store server at `store` (a local channel gets its
/// port now). Returns once a lookup on the same connection shows the entry, so anyone
/// who looks the name up afterwards finds it. A later registration of the name wins.
///
/// # Errors
/// [`ChanError::BadName`] for a name the store protocol cannot carry; [`ChanError::Registry`]
/// when the store server cannot be reached or does not keep the entry;
/// [`ChanError::Listen`] when the channel cannot get a port.
pub fn register(store: impl ToSocketAddrs, name: &str, chan: &Chan) -> Result<(), ChanError> {
    check_name(name)?;
    let text = chan.to_term()?.to_string();
    let mut client =
        StoreClient::connect(store, Framing::Line).map_err(|e| ChanError::Registry(e.into()))?;
    client.store(name.as_bytes(), text.as_bytes())?;
    match client.lookup(name.as_bytes())? {
        Some(_) => Ok(()),
        None => Err(ChanError::Registry(
            crate::store::client::ClientError::Unexpected(b"nothing".to_vec()),
        )),
    }
}

/// The channel registered under `name` in the store server at `store`, imported by
/// `node`: one of `node`'s own channels comes back local.
///
/// # Errors
/// [`ChanError::NotRegistered`] on a miss, [`ChanError::NotAChan`] when the value is not
/// a `{remote_chan,Host,Port}`, [`ChanError::BadName`] and [`ChanError::Registry`] as
/// [`register`].
pub fn lookup(node: &Node, store: impl ToSocketAddrs, name: &str) -> Result<Chan, ChanError> {
    check_name(name)?;
    let mut client =
        StoreClient::connect(store, Framing::Line).map_err(|e| ChanError::Registry(e.into()))?;
    let Some(value) = client.lookup(name.as_bytes())? else {
        return Err(ChanError::NotRegistered(name.to_owned()));
    };
    let not_a_chan = || ChanError::NotAChan {
        name: name.to_owned(),
        value: String::from_utf8_lossy(&value).into_owned(),
    };
    let term = crate::term::parse_bytes_with(&value, &node.config().term_limits)
        .map_err(|_| not_a_chan())?;
    match node.import(term) {
        Value::Chan(chan) => Ok(chan),
        _ => Err(not_a_chan()),
    }
}

/// Removes the entry for `name` if it still names `chan`: a registration made since by
/// another process stays. (Between the lookup and the delete another process could
/// register the name; the window is one round trip, and the cost a name to register
/// again.) Returns whether the entry was removed.
///
/// # Errors
/// As [`register`].
pub fn unregister(store: impl ToSocketAddrs, name: &str, chan: &Chan) -> Result<bool, ChanError> {
    check_name(name)?;
    let text = chan.to_term()?.to_string();
    let mut client =
        StoreClient::connect(store, Framing::Line).map_err(|e| ChanError::Registry(e.into()))?;
    if client.lookup(name.as_bytes())?.as_deref() != Some(text.as_bytes()) {
        return Ok(false);
    }
    Ok(client.delete(name.as_bytes())?)
}

fn check_name(name: &str) -> Result<(), ChanError> {
    // The store's key ends at the first comma, and a line at the first newline.
    if name.is_empty() || name.contains([',', '\n', '\r']) {
        return Err(ChanError::BadName(name.to_owned()));
    }
    Ok(())
}
