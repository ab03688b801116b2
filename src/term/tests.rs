use super::*;

fn atom(name: &str) -> Term {
    Term::atom(name)
}

fn int(value: i64) -> Term {
    Term::int(value)
}

fn ok(text: &str) -> Term {
    match parse(text) {
        Ok(term) => term,
        Err(e) => panic!("{text:?}: {e}"),
    }
}

fn err(text: &str) -> TermError {
    match parse(text) {
        Ok(term) => panic!("{text:?} parsed as {term:?}"),
        Err(e) => e,
    }
}

fn fails(text: &str, kind: TermErrorKind, offset: usize) {
    assert_eq!(err(text), TermError { kind, offset }, "{text:?}");
}

/// Equality that tells `-0.0` from `0.0`, which the derived one does not.
fn same(a: &Term, b: &Term) -> bool {
    match (a, b) {
        (Term::Float(x), Term::Float(y)) => x.to_bits() == y.to_bits(),
        (Term::Tuple(xs), Term::Tuple(ys)) | (Term::List(xs), Term::List(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same(x, y))
        }
        _ => a == b,
    }
}

fn printed(term: &Term) -> String {
    let text = term.to_string();
    let mut bytes = b"prefix".to_vec();
    term.write_to(&mut bytes);
    assert_eq!(&bytes[6..], text.as_bytes(), "write_to and Display differ");
    text
}

const STACK: usize = 128 * 1024;

fn on_small_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("the small-stack thread panicked");
}

/// Takes a term apart without recursion, for terms deeper than `Drop` can handle.
fn dismantle(term: Term) {
    let mut pending = vec![term];
    while let Some(term) = pending.pop() {
        if let Term::Tuple(items) | Term::List(items) = term {
            pending.extend(items);
        }
    }
}

#[test]
fn classic_protocol_examples() {
    let chan = Term::tuple(vec![
        atom("remote_chan"),
        Term::tuple(vec![int(127), int(0), int(0), int(1)]),
        int(40123),
    ]);
    assert_eq!(ok("{remote_chan,{127,0,0,1},40123}"), chan);
    let just = ok("{just,{remote_chan,{127,0,0,1},40123}}\n");
    assert_eq!(just, Term::tuple(vec![atom("just"), chan.clone()]));
    assert_eq!(printed(&just), "{just,{remote_chan,{127,0,0,1},40123}}");

    let msg = ok("{remote_msg,[104,105]}");
    let (tag, rest) = msg.tagged().expect("tagged");
    assert_eq!(tag, "remote_msg");
    assert_eq!(rest[0].as_text().as_deref(), Some("hi"));
    assert_eq!(printed(&msg), "{remote_msg,[104,105]}");
}

#[test]
fn whitespace_and_final_dot() {
    let expected = Term::tuple(vec![atom("a"), Term::list(vec![int(1), int(2)])]);
    for text in [
        "{a,[1,2]}",
        "{a,[1,2]}.",
        " \t{ a , [ 1 ,\r\n2 ] }\r\n",
        "{a,[1,2]} . \n",
        "{a,[1,2]}.\n",
    ] {
        assert_eq!(ok(text), expected, "{text:?}");
    }
    assert_eq!(ok("{ }"), Term::tuple(vec![]));
    assert_eq!(ok("[\n]"), Term::list(vec![]));
    assert_eq!(ok("1."), int(1));
}

#[test]
fn atoms() {
    assert_eq!(ok("hello"), atom("hello"));
    assert_eq!(ok("a@b_C9"), atom("a@b_C9"));
    assert_eq!(ok("'Hello World'"), atom("Hello World"));
    assert_eq!(ok("''"), atom(""));
    assert_eq!(ok(r"'it\'s'"), atom("it's"));
    assert_eq!(ok("'\"'"), atom("\""));
    assert_eq!(ok("'\\n'"), atom("\n"));
    // Latin-1 letters and reserved words, as Erlang's own printer may write them.
    assert_eq!(ok("ßtraße"), atom("ßtraße"));
    assert_eq!(ok("{end,of}"), Term::tuple(vec![atom("end"), atom("of")]));
    assert!(ok("disconnect").is_atom("disconnect"));
    assert!(!ok("disconnect").is_atom("exit"));

    let longest = "a".repeat(255);
    assert_eq!(ok(&longest), atom(&longest));
    assert_eq!(ok(&format!("'{longest}'")), atom(&longest));
    fails(&"a".repeat(256), TermErrorKind::AtomTooLong, 0);
    fails(
        &format!("['{}']", "é".repeat(256)),
        TermErrorKind::AtomTooLong,
        1,
    );
}

#[test]
fn atoms_print_bare_only_when_erlang_reads_them_bare() {
    for (name, text) in [
        ("hello", "hello"),
        ("a@b_C9", "a@b_C9"),
        ("Hello", "'Hello'"),
        ("_x", "'_x'"),
        ("9", "'9'"),
        ("", "''"),
        ("hello world", "'hello world'"),
        ("it's", r"'it\'s'"),
        ("a\\b", r"'a\\b'"),
        ("say \"hi\"", "'say \"hi\"'"),
        ("tab\there", r"'tab\there'"),
        ("é", "'é'"),
        ("end", "'end'"),
        ("maybe", "'maybe'"),
        ("ends", "ends"),
    ] {
        assert_eq!(printed(&atom(name)), text, "{name:?}");
        assert_eq!(ok(text), atom(name), "{text:?}");
    }
}

#[test]
fn reserved_words_round_trip_quoted() {
    let words = "after and andalso band begin bnot bor bsl bsr bxor case catch cond div \
                 end fun if let maybe else not of or orelse receive rem try when xor";
    for word in words.split_whitespace() {
        let text = printed(&atom(word));
        assert_eq!(text, format!("'{word}'"));
        assert_eq!(ok(&text), atom(word));
    }
}

#[test]
fn integers() {
    assert_eq!(ok("0"), int(0));
    assert_eq!(ok("42"), int(42));
    assert_eq!(ok("-42"), int(-42));
    assert_eq!(ok("+42"), int(42));
    assert_eq!(ok("- 42"), int(-42));
    assert_eq!(ok("007"), int(7));
    assert_eq!(ok("1_000_000"), int(1_000_000));
    assert_eq!(ok("9223372036854775807"), int(i64::MAX));
    assert_eq!(ok("-9223372036854775808"), int(i64::MIN));
    assert_eq!(ok("[-1,-2]"), Term::list(vec![int(-1), int(-2)]));
    fails("9223372036854775808", TermErrorKind::IntegerOutOfRange, 0);
    fails(
        "[-9223372036854775809]",
        TermErrorKind::IntegerOutOfRange,
        1,
    );
    fails(
        "99999999999999999999999",
        TermErrorKind::IntegerOutOfRange,
        0,
    );
    assert_eq!(printed(&int(i64::MIN)), "-9223372036854775808");
}

#[test]
fn based_integers() {
    assert_eq!(ok("16#ff"), int(255));
    assert_eq!(ok("16#FF"), int(255));
    assert_eq!(ok("-16#ff"), int(-255));
    assert_eq!(ok("2#1010"), int(10));
    assert_eq!(ok("8#777"), int(511));
    assert_eq!(ok("36#zz"), int(36 * 36 - 1));
    assert_eq!(ok("16#ff_ff"), int(0xffff));
    assert_eq!(ok("16#7fffffffffffffff"), int(i64::MAX));
    assert_eq!(ok("-16#8000000000000000"), int(i64::MIN));
    fails("16#8000000000000000", TermErrorKind::IntegerOutOfRange, 0);
    fails("1#0", TermErrorKind::BadInteger, 0);
    fails("37#0", TermErrorKind::BadInteger, 0);
    fails("99999999999999999999#0", TermErrorKind::BadInteger, 0);
    fails("16#", TermErrorKind::BadInteger, 3);
    fails("16#g", TermErrorKind::BadInteger, 3);
    fails("2#102", TermErrorKind::BadInteger, 4);
}

#[test]
fn char_literals() {
    assert_eq!(ok("$a"), int(97));
    assert_eq!(ok("$ "), int(32));
    assert_eq!(ok("$é"), int(0xe9));
    assert_eq!(ok("$€"), int(0x20ac));
    assert_eq!(ok(r"$\n"), int(10));
    assert_eq!(ok(r"$\\"), int(92));
    assert_eq!(ok(r"$\x{1F600}"), int(0x1f600));
    assert_eq!(ok("-$a"), int(-97));
    assert_eq!(ok("[$h,$i]").as_text().as_deref(), Some("hi"));
    fails("$", TermErrorKind::UnexpectedEnd, 1);
    fails("$ab", TermErrorKind::TrailingInput, 2);
    fails("[$ab]", TermErrorKind::UnexpectedChar('b'), 3);
}

#[test]
fn floats() {
    assert_eq!(ok("1.5"), Term::float(1.5));
    assert_eq!(ok("-0.25"), Term::float(-0.25));
    assert_eq!(ok("+0.5"), Term::float(0.5));
    assert_eq!(ok("1.0e10"), Term::float(1.0e10));
    assert_eq!(ok("2.5E-3"), Term::float(2.5e-3));
    assert_eq!(ok("2.5e+3"), Term::float(2500.0));
    assert_eq!(ok("1_000.000_5"), Term::float(1000.0005));
    assert_eq!(
        ok("{1.5,x}"),
        Term::tuple(vec![Term::float(1.5), atom("x")])
    );
    let negative_zero = ok("-0.0").as_float().expect("float");
    assert!(negative_zero == 0.0 && negative_zero.is_sign_negative());

    fails("1e10", TermErrorKind::BadFloat, 0);
    fails("[1E5]", TermErrorKind::BadFloat, 1);
    fails("1.0e", TermErrorKind::BadFloat, 0);
    fails("1.0e+", TermErrorKind::BadFloat, 0);
    fails("1.0e400", TermErrorKind::BadFloat, 0);
    fails("-1.0e400", TermErrorKind::BadFloat, 0);
    fails(".5", TermErrorKind::UnexpectedChar('.'), 0);
    fails("1.e5", TermErrorKind::TrailingInput, 2);
    fails("1.5.5", TermErrorKind::TrailingInput, 4);
    fails("12ab", TermErrorKind::UnexpectedChar('a'), 2);
    fails("1_", TermErrorKind::UnexpectedChar('_'), 1);
    fails("1__0", TermErrorKind::UnexpectedChar('_'), 1);
}

#[test]
fn floats_print_in_erlang_syntax() {
    for (value, text) in [
        (1.0, "1.0"),
        (1.5, "1.5"),
        (-0.25, "-0.25"),
        (0.1, "0.1"),
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (100.0, "100.0"),
        (123456789012345.0, "123456789012345.0"),
        (1e16, "1.0e16"),
        (1e20, "1.0e20"),
        (1.5e20, "1.5e20"),
        (-1e20, "-1.0e20"),
        (1e-5, "0.00001"),
        (1e-7, "1.0e-7"),
        (2.5e-7, "2.5e-7"),
        (f64::MAX, "1.7976931348623157e308"),
        (f64::MIN_POSITIVE, "2.2250738585072014e-308"),
        (5e-324, "5.0e-324"),
    ] {
        let term = Term::float(value);
        assert_eq!(printed(&term), text);
        assert!(same(&ok(text), &term), "{text}");
    }
    assert_eq!(printed(&Term::float(f64::INFINITY)), "inf");
    assert_eq!(printed(&Term::float(f64::NEG_INFINITY)), "neg_inf");
    assert_eq!(printed(&Term::float(f64::NAN)), "nan");
}

#[test]
fn strings_and_escapes() {
    assert_eq!(ok(r#""hello""#), Term::str("hello"));
    assert_eq!(ok(r#""""#), Term::str(""));
    assert_eq!(ok(r#""héllo €😀""#), Term::str("héllo €😀"));
    assert_eq!(ok("\"two\nlines\""), Term::str("two\nlines"));
    assert_eq!(ok(r#""it's""#), Term::str("it's"));
    for (escape, expected) in [
        (r"\b", "\x08"),
        (r"\d", "\x7f"),
        (r"\e", "\x1b"),
        (r"\f", "\x0c"),
        (r"\n", "\n"),
        (r"\r", "\r"),
        (r"\s", " "),
        (r"\t", "\t"),
        (r"\v", "\x0b"),
        (r"\\", "\\"),
        (r"\'", "'"),
        (r#"\""#, "\""),
        (r"\0", "\0"),
        (r"\7", "\x07"),
        (r"\12", "\n"),
        (r"\101", "A"),
        (r"\777", "\u{1ff}"),
        (r"\1011", "A1"),
        (r"\18", "\x018"),
        (r"\x41", "A"),
        (r"\x4a", "J"),
        (r"\x411", "A1"),
        (r"\x{41}", "A"),
        (r"\x{0000041}", "A"),
        (r"\x{20AC}", "€"),
        (r"\x{1f600}", "😀"),
        (r"\x{10FFFF}", "\u{10ffff}"),
        (r"\^a", "\x01"),
        (r"\^z", "\x1a"),
        (r"\^A", "\x01"),
        (r"\^@", "\0"),
        (r"\^[", "\x1b"),
        (r"\^?", "\x7f"),
        (r"\q", "q"),
        (r"\é", "é"),
        ("\\\n", "\n"),
    ] {
        let text = format!("\"<{escape}>\"");
        assert_eq!(ok(&text), Term::Str(format!("<{expected}>")), "{text}");
        let quoted_atom = format!("'<{escape}>'");
        assert_eq!(ok(&quoted_atom), Term::Atom(format!("<{expected}>")));
    }
    fails(r#""\x{110000}""#, TermErrorKind::BadEscape, 1);
    fails(r#""\x{D800}""#, TermErrorKind::BadEscape, 1);
    fails(r#""\x{FFFFFFFFFFFF}""#, TermErrorKind::BadEscape, 1);
    fails(r#""\x{}""#, TermErrorKind::BadEscape, 1);
    fails(r#""\x{4g}""#, TermErrorKind::BadEscape, 1);
    fails(r#"[1,"ab\xZZ"]"#, TermErrorKind::BadEscape, 6);
    fails(r#""\x4""#, TermErrorKind::BadEscape, 1);
    fails(r#""\^1""#, TermErrorKind::BadEscape, 1);
    fails(r#""\x{41"#, TermErrorKind::UnexpectedEnd, 6);
    fails(r#""abc\"#, TermErrorKind::UnexpectedEnd, 5);
    fails(r#""abc"#, TermErrorKind::UnexpectedEnd, 4);
    fails("'abc", TermErrorKind::UnexpectedEnd, 4);
}

#[test]
fn adjacent_strings_concatenate() {
    assert_eq!(ok(r#""ab" "cd""#), Term::str("abcd"));
    assert_eq!(ok(r#""ab""cd""#), Term::str("abcd"));
    assert_eq!(
        ok("{\"a\"\n \"b\" \"c\",1}"),
        Term::tuple(vec![Term::str("abc"), int(1)])
    );
    assert_eq!(ok(r#""ab" ."#), Term::str("ab"));
    fails(r#""ab" 'cd'"#, TermErrorKind::TrailingInput, 5);
}

#[test]
fn strings_print_with_erlang_escapes() {
    for (text, expected) in [
        ("hi", r#""hi""#),
        ("", r#""""#),
        ("say \"hi\"", r#""say \"hi\"""#),
        ("it's", r#""it's""#),
        ("a\\b", r#""a\\b""#),
        ("l1\nl2\r\n\tx", r#""l1\nl2\r\n\tx""#),
        ("\0\x01\x1b\x1f\x7f", r#""\x00\x01\x1B\x1F\x7F""#),
        ("\x01a", r#""\x01a""#),
        ("héllo €😀", "\"héllo €😀\""),
    ] {
        let term = Term::str(text);
        assert_eq!(printed(&term), expected);
        assert_eq!(ok(expected), term);
    }
}

#[test]
fn accessors() {
    let send = ok(r#"{send,"bob",[104,105]}"#);
    let (tag, rest) = send.tagged().expect("tagged");
    assert_eq!(tag, "send");
    assert_eq!(
        rest,
        &[Term::str("bob"), Term::list(vec![int(104), int(105)])][..]
    );
    assert_eq!(rest[0].as_text().as_deref(), Some("bob"));
    assert_eq!(rest[1].as_text().as_deref(), Some("hi"));
    assert_eq!(send.as_tuple().map(<[Term]>::len), Some(3));
    assert_eq!(send.as_list(), None);
    assert_eq!(ok("[]").as_list(), Some(&[][..]));
    assert_eq!(ok("[]").as_text().as_deref(), Some(""));
    assert_eq!(ok("[8364,128512]").as_text().as_deref(), Some("€😀"));
    assert_eq!(ok("[55296]").as_text(), None);
    assert_eq!(ok("[-1]").as_text(), None);
    assert_eq!(ok("[4294967393]").as_text(), None);
    assert_eq!(ok("[104,x]").as_text(), None);
    assert_eq!(ok("hi").as_text(), None);
    assert_eq!(ok("5").as_int(), Some(5));
    assert_eq!(ok("five").as_int(), None);
    assert_eq!(ok("five").as_atom(), Some("five"));
    assert_eq!(ok("\"five\"").as_atom(), None);
    assert_eq!(ok("disconnect").tagged(), None);
    assert_eq!(ok("{}").tagged(), None);
    assert_eq!(ok("{1,2}").tagged(), None);
    assert_eq!(ok("{exit}").tagged(), Some(("exit", &[][..])));
    assert_eq!("{a}".parse::<Term>(), Ok(Term::tuple(vec![atom("a")])));
}

#[test]
fn structural_errors_and_offsets() {
    fails("", TermErrorKind::UnexpectedEnd, 0);
    fails("  \n", TermErrorKind::UnexpectedEnd, 3);
    fails(".", TermErrorKind::UnexpectedChar('.'), 0);
    fails("{a,}", TermErrorKind::UnexpectedChar('}'), 3);
    fails("{,a}", TermErrorKind::UnexpectedChar(','), 1);
    fails("{a b}", TermErrorKind::UnexpectedChar('b'), 3);
    fails("{a,b]", TermErrorKind::UnexpectedChar(']'), 4);
    fails("[a,b}", TermErrorKind::UnexpectedChar('}'), 4);
    fails("{a,{b,c}", TermErrorKind::UnexpectedEnd, 8);
    fails("[1,2", TermErrorKind::UnexpectedEnd, 4);
    fails("}", TermErrorKind::UnexpectedChar('}'), 0);
    fails("Var", TermErrorKind::UnexpectedChar('V'), 0);
    fails("{_}", TermErrorKind::UnexpectedChar('_'), 1);
    fails("{a,%x}", TermErrorKind::UnexpectedChar('%'), 3);
    fails("{a,€}", TermErrorKind::UnexpectedChar('€'), 3);
    fails("-", TermErrorKind::UnexpectedEnd, 1);
    fails("-a", TermErrorKind::UnexpectedChar('a'), 1);
    fails(
        "[a|b]",
        TermErrorKind::Unsupported("improper list [H|T]"),
        2,
    );
    fails("{a|b}", TermErrorKind::UnexpectedChar('|'), 2);
}

#[test]
fn trailing_input() {
    fails(
        "{remote_chan,{127,0,0,1},40123}}",
        TermErrorKind::TrailingInput,
        31,
    );
    fails("a b", TermErrorKind::TrailingInput, 2);
    fails("1 2", TermErrorKind::TrailingInput, 2);
    fails("a..", TermErrorKind::TrailingInput, 2);
    fails("a. b", TermErrorKind::TrailingInput, 3);
    fails("{a}{b}", TermErrorKind::TrailingInput, 3);
    fails("ok\0", TermErrorKind::TrailingInput, 2);
}

#[test]
fn unsupported_erlang_terms() {
    for (text, what, offset) in [
        ("<<1,2>>", "binary <<...>>", 0),
        ("{<<\"a\">>}", "binary <<...>>", 1),
        ("<0.42.0>", "pid <...>", 0),
        ("#{a=>1}", "map #{...}", 0),
        ("[#Ref<0.1.2.3>]", "reference, port, fun or record #...", 1),
        (
            "#Fun<erl_eval.6.1>",
            "reference, port, fun or record #...",
            0,
        ),
        ("#Port<0.7>", "reference, port, fun or record #...", 0),
    ] {
        let e = err(text);
        assert_eq!(e.kind, TermErrorKind::Unsupported(what), "{text}");
        assert_eq!(e.offset, offset, "{text}");
        assert_eq!(e.reason_atom(), "unsupported");
    }
}

#[test]
fn bytes_must_be_utf8() {
    assert_eq!(
        parse_bytes(b"{a,\"\xc3\xa9\"}\n"),
        Ok(Term::tuple(vec![atom("a"), Term::str("é")]))
    );
    let e = parse_bytes(b"[1,\xff]").expect_err("invalid UTF-8");
    assert_eq!(e, TermError::new(TermErrorKind::InvalidUtf8, 3));
    assert_eq!(e.reason_atom(), "invalid_utf8");
    assert_eq!(e.to_string(), "invalid UTF-8 at byte 3");
}

#[test]
fn errors_display_and_reason_atoms() {
    let e = err("{remote_chan,{127,0,0,1}}}");
    assert_eq!(e.to_string(), "trailing input after the term at byte 25");
    let e = err("{a,b,}");
    assert_eq!(e.to_string(), "unexpected '}' at byte 5");
    assert_eq!(e.reason_atom(), "bad_term");
    assert_eq!(err("[a").to_string(), "unexpected end of input at byte 2");
    assert_eq!(err("99999999999999999999").reason_atom(), "bad_term");
    let deep = err(&"[".repeat(100));
    assert_eq!(deep.to_string(), "nesting deeper than 64 at byte 64");
    assert_eq!(deep.reason_atom(), "too_deep");
    let limits = Limits {
        max_len: 4,
        ..Limits::default()
    };
    let long = parse_with("12345", &limits).expect_err("too long");
    assert_eq!(long.to_string(), "input longer than 4 bytes");
    assert_eq!(long.reason_atom(), "too_long");
    let boxed: Box<dyn std::error::Error> = Box::new(long);
    assert!(boxed.source().is_none());
}

#[test]
fn length_limit() {
    let limits = Limits {
        max_len: 8,
        ..Limits::default()
    };
    assert_eq!(parse_with("[1,2,34]", &limits), Ok(ok("[1,2,34]")));
    let too_long = TermError::new(TermErrorKind::TooLong { limit: 8 }, 8);
    assert_eq!(parse_with("[1,2,345]", &limits), Err(too_long));
    // Refused on length alone: the bytes are not even valid UTF-8.
    assert_eq!(parse_bytes_with(&[0xff; 9], &limits), Err(too_long));
    assert_eq!(Limits::default().max_len, 1024 * 1024);
    let huge = " ".repeat(Limits::default().max_len + 1);
    assert_eq!(err(&huge).kind, TermErrorKind::TooLong { limit: 1 << 20 });
}

#[test]
fn depth_limit() {
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    assert_eq!(Limits::default().max_depth, 64);
    assert!(parse(&nested(64)).is_ok());
    fails(&nested(65), TermErrorKind::TooDeep { limit: 64 }, 64);
    let mixed = format!("{}x{}", "{[".repeat(32), "]}".repeat(32));
    assert!(parse(&mixed).is_ok());
    let shallow = Limits {
        max_depth: 1,
        ..Limits::default()
    };
    assert_eq!(parse_with("5", &shallow), Ok(int(5)));
    assert!(parse_with("[1,{}]", &shallow).is_err());
    assert_eq!(
        parse_with(
            "{{}}",
            &Limits {
                max_depth: 0,
                ..shallow
            }
        ),
        Err(TermError::new(TermErrorKind::TooDeep { limit: 0 }, 0))
    );
}

#[test]
fn million_deep_input_fails_fast_on_a_small_stack() {
    on_small_stack(|| {
        for open in ["[", "{"] {
            let text = open.repeat(1_000_000);
            let started = std::time::Instant::now();
            assert_eq!(
                parse(&text),
                Err(TermError::new(TermErrorKind::TooDeep { limit: 64 }, 64))
            );
            assert_eq!(
                parse_bytes(text.as_bytes()).map_err(|e| e.kind),
                Err(TermErrorKind::TooDeep { limit: 64 })
            );
            assert!(started.elapsed() < std::time::Duration::from_millis(100));
        }
        // Without depth or size limits the parser's own stack is the heap: a million open
        // brackets end in UnexpectedEnd, not in a stack overflow.
        let unlimited = Limits {
            max_depth: usize::MAX,
            max_nodes: usize::MAX,
            ..Limits::default()
        };
        let text = "[{".repeat(500_000);
        assert_eq!(
            parse_with(&text, &unlimited),
            Err(TermError::new(TermErrorKind::UnexpectedEnd, 1_000_000))
        );
    });
}

#[test]
fn deep_terms_print_on_a_small_stack() {
    on_small_stack(|| {
        let depth = 100_000;
        let mut term = atom("x");
        for level in 0..depth {
            term = if level % 2 == 0 {
                Term::list(vec![term])
            } else {
                Term::tuple(vec![int(1), term])
            };
        }
        let text = term.to_string();
        let mut bytes = Vec::new();
        term.write_to(&mut bytes);
        // Before any assertion: unwinding would drop the term recursively.
        dismantle(term);
        assert_eq!(bytes, text.as_bytes());
        assert_eq!(text.len(), depth * 2 + depth / 2 * 2 + 1);
        assert!(text.starts_with("{1,[{1,[") && text.ends_with("]}]}"));
        let x = depth * 2;
        assert_eq!(&text[x - 12..x + 7], "{1,[{1,[{1,[x]}]}]}");

        let parsed = ok(&format!("{}7{}", "[".repeat(64), "]".repeat(64)));
        assert_eq!(printed(&parsed).len(), 129);
    });
}

/// Random terms from a deterministic generator, so a failure reproduces from its seed.
struct Gen(crate::bench::Rng);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn char(&mut self) -> char {
        const AWKWARD: &[char] = &[
            'a',
            'z',
            'A',
            'Z',
            '0',
            '9',
            '_',
            '@',
            ' ',
            '"',
            '\'',
            '\\',
            '\n',
            '\r',
            '\t',
            '\0',
            '\x01',
            '\x1b',
            '\x1f',
            '\x7f',
            '\u{80}',
            '\u{9f}',
            'é',
            'ß',
            'ÿ',
            '€',
            '😀',
            '\u{2028}',
            '\u{fffe}',
            '\u{10ffff}',
            '{',
            '}',
            '[',
            ']',
            ',',
            '.',
            '|',
            '$',
            '#',
            '%',
            '<',
            '>',
            '^',
            'x',
        ];
        match self.below(4) {
            0 => char::from_u32(self.below(0x11_0000) as u32).unwrap_or('?'),
            _ => self.pick(AWKWARD),
        }
    }

    fn text(&mut self, max_chars: usize) -> String {
        let len = self.below(max_chars + 1);
        (0..len).map(|_| self.char()).collect()
    }

    fn atom(&mut self) -> String {
        match self.below(4) {
            0 => {
                const FIRST: &[u8] = b"abcxyz";
                const REST: &[u8] = b"azAZ09_@";
                let mut name = String::from(char::from(self.pick(FIRST)));
                for _ in 0..self.below(12) {
                    name.push(char::from(self.pick(REST)));
                }
                name
            }
            1 => self
                .pick(&[
                    "end", "case", "maybe", "else", "fun", "div", "ok", "true", "inf",
                ])
                .to_owned(),
            _ => self.text(20),
        }
    }

    fn int(&mut self) -> i64 {
        match self.below(4) {
            0 => self.pick(&[i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX]),
            1 => self.below(1000) as i64 - 500,
            _ => self.next() as i64,
        }
    }

    fn float(&mut self) -> f64 {
        let special = [
            0.0,
            -0.0,
            1.0,
            -1.5,
            0.1,
            1e16,
            1e-5,
            1e16 - 2.0,
            0.999_999 * 1e-5,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            f64::EPSILON,
            5e-324,
            -5e-324,
        ];
        match self.below(3) {
            0 => self.pick(&special),
            1 => (self.next() as i64 as f64) / 1024.0,
            _ => loop {
                let value = f64::from_bits(self.next());
                if value.is_finite() {
                    break value;
                }
            },
        }
    }

    fn term(&mut self, depth: usize) -> Term {
        let kinds = if depth >= 6 { 4 } else { 6 };
        match self.below(kinds) {
            0 => Term::Atom(self.atom()),
            1 => Term::Int(self.int()),
            2 => Term::Float(self.float()),
            3 => Term::Str(self.text(12)),
            kind => {
                let items = (0..self.below(5)).map(|_| self.term(depth + 1)).collect();
                if kind == 4 {
                    Term::Tuple(items)
                } else {
                    Term::List(items)
                }
            }
        }
    }
}

#[test]
fn printed_terms_parse_back_identical() {
    let mut rng = Gen(crate::bench::Rng::new(0x9e37_79b9_7f4a_7c15));
    let mut bytes = Vec::new();
    for case in 0..4000 {
        let term = rng.term(0);
        let text = printed(&term);
        let back = match parse(&text) {
            Ok(back) => back,
            Err(e) => panic!("case {case}: {text:?} failed: {e}"),
        };
        assert!(
            same(&term, &back),
            "case {case}: {term:?} -> {text:?} -> {back:?}"
        );

        bytes.clear();
        term.write_to(&mut bytes);
        bytes.extend_from_slice(b".\r\n");
        let back = parse_bytes(&bytes).expect("written bytes parse");
        assert!(same(&term, &back), "case {case}: via write_to");
    }
}

#[test]
fn a_parse_builds_at_most_max_nodes_terms() {
    // The attack from the bounded-memory issue: a 0.92 MiB list of zeros parsed to 14.7 MiB.
    let zeros = format!("[{}0]", "0,".repeat(480_000));
    assert!(zeros.len() < Limits::default().max_len);
    let err = parse(&zeros).unwrap_err();
    assert_eq!(err.kind, TermErrorKind::TooBig { limit: 131_072 });
    assert_eq!(err.reason_atom(), "too_big");
    // Every term counts, the enclosing list too.
    let small = Limits {
        max_nodes: 4,
        ..Limits::default()
    };
    assert!(parse_with("[1,2,3]", &small).is_ok());
    assert_eq!(
        parse_with("[1,2,3,4]", &small).map_err(|e| e.kind),
        Err(TermErrorKind::TooBig { limit: 4 })
    );
    assert_eq!(
        parse_with(
            "{[],{}}",
            &Limits {
                max_nodes: 2,
                ..small
            }
        )
        .map_err(|e| e.kind),
        Err(TermErrorKind::TooBig { limit: 2 })
    );
}

#[test]
fn a_parsed_term_holds_a_fixed_multiple_of_its_text() {
    // The densest inputs: one-character terms with one separator each.
    let worst = [
        format!("[{}0]", "0,".repeat(100_000)),
        format!("[{}a]", "a,".repeat(100_000)),
        format!("{{{}{{}}}}", "{},".repeat(60_000)),
        format!("[{}\"\"]", "\"\",".repeat(60_000)),
        format!("[{}]", "[1,{a,\"b\"}],".repeat(20_000) + "x"),
    ];
    for text in &worst {
        let term = parse(text).unwrap();
        let held = term.heap_bytes();
        let factor = held as f64 / text.len() as f64;
        assert!(factor <= 16.6, "{factor:.2}x for {}", &text[..20]);
    }
    let under_budget = format!("[{}0]", "0,".repeat(131_070));
    let term = parse(&under_budget).unwrap();
    assert!(term.heap_bytes() <= 4 * Limits::default().max_len + Term::NODE_BYTES);
}
