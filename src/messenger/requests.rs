//! Client requests decided, pure: the request, what this server is to clients, the state
//! and the sessions in; the change to make, the replies and the session effect out. The
//! replica applies the effects under its lock ([`super::replication`]); the connection
//! code ([`super::server`]) reads the frames and writes the replies.

use super::clients::Sessions;
use super::protocol::{Delivery, Reply, Request, Violation};
use super::state::{Change, Limits, Session, State};

/// What this server is to clients right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Serving {
    /// The primary: it decides requests.
    Primary,
    /// Not the primary; this server (an index in `--peers`) is, as far as this one knows.
    Redirect(usize),
    /// Not the primary, and no primary is known (or this server is stopping).
    Unavailable,
}

/// What one request does, in the order the replica carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Effects {
    /// A change to append, apply and replicate first.
    pub(super) change: Option<Change>,
    /// Replies for the requesting connection, in order.
    pub(super) replies: Vec<Reply>,
    /// The replies wait until every change made so far is committed: what they reveal, or
    /// depend on, must be. A redirect reveals nothing and leaves at once.
    pub(super) after_commit: bool,
    /// The session effect: `Keep`, `LogIn` or `LogOut` (a quit is a logout and `close`).
    pub(super) session: Session,
    /// A login's session token.
    pub(super) token: Option<u64>,
    /// Close the connection after the replies.
    pub(super) close: bool,
}

impl Effects {
    fn nothing() -> Effects {
        Effects {
            change: None,
            replies: Vec::new(),
            after_commit: true,
            session: Session::Keep,
            token: None,
            close: false,
        }
    }
}

/// Decides one request from connection `conn` within `limits`. `request` is the decoded
/// frame, or the rule it broke.
pub(super) fn respond(
    serving: Serving,
    state: &State,
    limits: Limits,
    sessions: &Sessions,
    conn: u64,
    request: Result<Request, Violation>,
) -> Effects {
    let away = match serving {
        Serving::Primary => None,
        Serving::Redirect(p) => Some(Reply::Redirect(p)),
        Serving::Unavailable => Some(Reply::Unavailable),
    };
    if let Some(reply) = away {
        // A confirm is never answered, here either: the client expects no reply to it and
        // would take one for the answer to its next request, which gets the redirect
        // itself. Nothing else changes: a backup applies no confirm either way, and the
        // messages stay queued until a confirm reaches the primary.
        if matches!(request, Ok(Request::Confirm { .. })) {
            return Effects::nothing();
        }
        return Effects {
            replies: vec![reply],
            after_commit: false,
            close: true,
            ..Effects::nothing()
        };
    }
    let request = match request {
        Ok(request) => request,
        Err(v) => {
            return Effects {
                replies: vec![Reply::Refused(v)],
                ..Effects::nothing()
            }
        }
    };
    let token = match &request {
        Request::Login { session, .. } => *session,
        _ => None,
    };
    let decision = state.decide(
        limits,
        sessions.user(conn),
        |name| sessions.held_against(name, token),
        &request,
    );
    let mut replies: Vec<Reply> = decision.reply.into_iter().collect();
    let mut close = false;
    let session = match decision.session {
        Session::LogIn(name) => {
            // The hand-over follows the LoggedIn reply. A login changes nothing, so this
            // mailbox is also the one after the (absent) change.
            replies.extend(state.mailbox(&name).map(|m| {
                Reply::Deliver(Delivery {
                    id: m.id,
                    from: m.from.clone(),
                    text: m.text.clone(),
                })
            }));
            Session::LogIn(name)
        }
        Session::Quit => {
            close = true;
            Session::LogOut
        }
        other => other,
    };
    Effects {
        change: decision.change,
        replies,
        after_commit: true,
        session,
        token,
        close,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messenger::protocol::MessageId;

    /// ann and bob exist; bob has two messages waiting from ann; ann is logged in on
    /// connection 1.
    fn world() -> (State, Sessions) {
        let mut state = State::new();
        let changes = [
            Change::Register {
                name: "ann".into(),
                nonce: 0,
            },
            Change::Register {
                name: "bob".into(),
                nonce: 0,
            },
            Change::Send {
                from: "ann".into(),
                to: "bob".into(),
                id: 1,
                text: "hi".into(),
            },
            Change::Send {
                from: "ann".into(),
                to: "bob".into(),
                id: 2,
                text: "there".into(),
            },
        ];
        for (seq, change) in (1..).zip(&changes) {
            state.apply(MessageId { epoch: 1, seq }, change);
        }
        let mut sessions = Sessions::default();
        sessions.log_in(1, "ann".into(), Some(9));
        (state, sessions)
    }

    fn login(name: &str) -> Result<Request, Violation> {
        Ok(Request::Login {
            name: name.into(),
            session: None,
        })
    }

    #[test]
    fn a_server_that_is_not_primary_redirects_and_closes_but_never_answers_a_confirm() {
        let (state, sessions) = world();
        for (serving, reply) in [
            (Serving::Redirect(2), Reply::Redirect(2)),
            (Serving::Unavailable, Reply::Unavailable),
        ] {
            for request in [login("bob"), Err(Violation::BadRequest)] {
                let e = respond(serving, &state, Limits::default(), &sessions, 1, request);
                assert_eq!(e.replies, vec![reply.clone()]);
                assert!(e.close && !e.after_commit && e.change.is_none());
                assert_eq!(e.session, Session::Keep);
            }
            let confirm = Ok(Request::Confirm {
                upto: MessageId { epoch: 1, seq: 4 },
            });
            let e = respond(serving, &state, Limits::default(), &sessions, 1, confirm);
            assert_eq!(e, Effects::nothing());
        }
    }

    #[test]
    fn a_bad_request_is_refused_after_the_changes_before_it_and_keeps_the_connection() {
        let (state, sessions) = world();
        let e = respond(
            Serving::Primary,
            &state,
            Limits::default(),
            &sessions,
            1,
            Err(Violation::BadName),
        );
        assert_eq!(e.replies, vec![Reply::Refused(Violation::BadName)]);
        assert!(e.after_commit && !e.close && e.change.is_none());
    }

    #[test]
    fn a_login_hands_over_the_mailbox_after_its_reply() {
        let (state, sessions) = world();
        let e = respond(
            Serving::Primary,
            &state,
            Limits::default(),
            &sessions,
            2,
            login("bob"),
        );
        let deliver = |seq, text: &str| {
            Reply::Deliver(Delivery {
                id: MessageId { epoch: 1, seq },
                from: "ann".into(),
                text: text.into(),
            })
        };
        let want = vec![
            Reply::LoggedIn { count: 2 },
            deliver(3, "hi"),
            deliver(4, "there"),
        ];
        assert_eq!(e.replies, want);
        assert_eq!(e.session, Session::LogIn("bob".into()));
        assert!(e.after_commit && !e.close && e.change.is_none());
    }

    #[test]
    fn the_sessions_decide_who_is_logged_in_where() {
        let (state, sessions) = world();
        // ann is logged in on connection 1, so not on 2 as well.
        let e = respond(
            Serving::Primary,
            &state,
            Limits::default(),
            &sessions,
            2,
            login("ann"),
        );
        assert_eq!(e.replies, vec![Reply::Refused(Violation::InUse)]);
        assert_eq!(e.session, Session::Keep);
        // Connection 1 sends as ann; connection 2, logged out, cannot.
        let send = Ok(Request::Send {
            from: "ann".into(),
            to: "bob".into(),
            id: 9,
            text: "yo".into(),
        });
        let e = respond(
            Serving::Primary,
            &state,
            Limits::default(),
            &sessions,
            1,
            send.clone(),
        );
        assert_eq!(e.replies, vec![Reply::Ok]);
        assert!(matches!(e.change, Some(Change::Send { id: 9, .. })));
        let e = respond(
            Serving::Primary,
            &state,
            Limits::default(),
            &sessions,
            2,
            send,
        );
        assert_eq!(e.replies, vec![Reply::Refused(Violation::NotLoggedIn)]);
        assert_eq!(e.change, None);
    }

    #[test]
    fn a_login_with_the_sessions_token_takes_it_over_and_no_other_does() {
        let (state, sessions) = world();
        let login = |session| {
            Ok(Request::Login {
                name: "ann".into(),
                session,
            })
        };
        for other in [None, Some(8)] {
            let e = respond(
                Serving::Primary,
                &state,
                Limits::default(),
                &sessions,
                2,
                login(other),
            );
            assert_eq!(
                e.replies,
                vec![Reply::Refused(Violation::InUse)],
                "{other:?}"
            );
        }
        // ann's own client, come back on connection 2: logged in there, with its token.
        let e = respond(
            Serving::Primary,
            &state,
            Limits::default(),
            &sessions,
            2,
            login(Some(9)),
        );
        assert_eq!(e.replies, vec![Reply::LoggedIn { count: 0 }]);
        assert_eq!(
            (e.session, e.token),
            (Session::LogIn("ann".into()), Some(9))
        );
        let mut after = sessions.clone();
        assert_eq!(
            after.log_in(2, "ann".into(), e.token),
            Some(1),
            "1 is taken over"
        );
        assert_eq!((after.user(1), after.conn_of("ann")), (None, Some(2)));
    }

    #[test]
    fn quit_logs_out_and_closes_after_its_reply() {
        let (state, sessions) = world();
        let e = respond(
            Serving::Primary,
            &state,
            Limits::default(),
            &sessions,
            1,
            Ok(Request::Quit),
        );
        assert_eq!(e.session, Session::LogOut);
        assert!(e.close && e.after_commit && e.change.is_none());
        let logout = Ok(Request::Logout { name: "ann".into() });
        let e = respond(
            Serving::Primary,
            &state,
            Limits::default(),
            &sessions,
            1,
            logout,
        );
        assert_eq!((e.session, e.close), (Session::LogOut, false));
    }
}
