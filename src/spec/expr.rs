//! The condition language used by trait filters and segment rules.
//!
//! ```text
//! expr    := or
//! or      := and ("or" and)*
//! and     := unary ("and" unary)*
//! unary   := "not" unary | cmp
//! cmp     := sum (op sum | "in" "[" literal ("," literal)* "]")?
//! op      := "==" | "!=" | ">=" | "<=" | ">" | "<"
//! sum     := product (("+" | "-") product)*
//! product := operand (("*" | "/") operand)*
//! operand := number | duration | string | true | false | null
//!          | "-" operand | call | path | "(" expr ")"
//! duration:= digits ("ms" | "s" | "m" | "h" | "d")      (milliseconds)
//! call    := ("starts_with" | "ends_with" | "contains" | "matches")
//!            "(" expr "," string ")"
//! path    := ident ("." ident)*
//! ```
//!
//! A path of three or more names is its first name and the field named by
//! the rest: `properties.address.city` reads the field `address.city` of
//! `properties` (nested objects of Segment messages are flattened so).
//!
//! **Nulls.** A missing field is `null`. Arithmetic with a `null` operand,
//! a division by zero, or a result that is not a finite number is `null`;
//! a comparison with `null` is false except `== null` and `!= null`; the
//! string functions are false on a value that is not a string; `not null`
//! is true (`null` is falsy).
//!
//! Parsing is done with `winnow`; every error carries the byte offset of the
//! problem inside the expression text.

use std::cmp::Ordering;
use std::fmt;

use winnow::error::ParserError;
use winnow::prelude::*;
use winnow::stream::{Location, Stream};
use winnow::token::{any, literal, take_while};
use winnow::LocatingSlice;

use crate::model::{Scalar, ScalarRef};

/// Byte range of a piece of an expression, relative to the expression text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// First byte (inclusive).
    pub start: usize,
    /// Last byte (exclusive).
    pub end: usize,
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `>=`
    Ge,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `<`
    Lt,
}

impl CmpOp {
    /// The operator as written in the source.
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Ge => ">=",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Lt => "<",
        }
    }
}

/// A parsed condition expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// A literal value.
    Lit(Scalar),
    /// A dotted field path, with its position in the expression text.
    Path(Vec<String>, Span),
    /// `not e`
    Not(Box<Expr>),
    /// `a and b and ...` (at least two operands).
    And(Vec<Expr>),
    /// `a or b or ...` (at least two operands).
    Or(Vec<Expr>),
    /// `a OP b`
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    /// `a in [l1, l2, ...]`
    In(Box<Expr>, Vec<Scalar>),
    /// `a + b`, `a - b`, `a * b`, `a / b`
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    /// `-a`
    Neg(Box<Expr>),
    /// `f(a, "literal")`: a string test.
    Call(StrTest, Box<Expr>),
}

/// An arithmetic operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArithOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
}

impl ArithOp {
    /// The operator as written in the source.
    pub fn as_str(self) -> &'static str {
        match self {
            ArithOp::Add => "+",
            ArithOp::Sub => "-",
            ArithOp::Mul => "*",
            ArithOp::Div => "/",
        }
    }

    fn apply(self, a: f64, b: f64) -> Option<f64> {
        let r = match self {
            ArithOp::Add => a + b,
            ArithOp::Sub => a - b,
            ArithOp::Mul => a * b,
            ArithOp::Div if b == 0.0 => return None,
            ArithOp::Div => a / b,
        };
        r.is_finite().then_some(r)
    }
}

/// A string test with its literal argument: `starts_with(x, "ab")`,
/// `ends_with`, `contains` (case-sensitive, on the string as is) and
/// `matches(x, "regex")` (Rust `regex` syntax, unanchored: add `^…$` to
/// match the whole string).
#[derive(Clone, Debug)]
pub enum StrTest {
    /// The string starts with the literal.
    StartsWith(String),
    /// The string ends with the literal.
    EndsWith(String),
    /// The string contains the literal.
    Contains(String),
    /// The regular expression matches somewhere in the string.
    Matches(regex::Regex),
}

impl PartialEq for StrTest {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name() && self.literal() == other.literal()
    }
}

impl StrTest {
    /// The function's name.
    pub fn name(&self) -> &'static str {
        match self {
            StrTest::StartsWith(_) => "starts_with",
            StrTest::EndsWith(_) => "ends_with",
            StrTest::Contains(_) => "contains",
            StrTest::Matches(_) => "matches",
        }
    }

    /// The literal argument as written (decoded).
    pub fn literal(&self) -> &str {
        match self {
            StrTest::StartsWith(s) | StrTest::EndsWith(s) | StrTest::Contains(s) => s,
            StrTest::Matches(r) => r.as_str(),
        }
    }

    /// Whether `s` passes the test.
    pub fn test(&self, s: &str) -> bool {
        match self {
            StrTest::StartsWith(l) => s.starts_with(l.as_str()),
            StrTest::EndsWith(l) => s.ends_with(l.as_str()),
            StrTest::Contains(l) => s.contains(l.as_str()),
            StrTest::Matches(r) => r.is_match(s),
        }
    }
}

/// The names of the string tests.
pub const STR_TESTS: [&str; 4] = ["starts_with", "ends_with", "contains", "matches"];

/// A syntax error in an expression.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("at byte {offset}: {message}")]
pub struct ExprError {
    /// Byte offset of the problem in the expression text.
    pub offset: usize,
    /// What was expected and what was found.
    pub message: String,
}

// ---------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------

type Input<'a> = LocatingSlice<&'a str>;
type PResult<T> = Result<T, PErr>;

/// Internal parser error: a position plus a message (empty for the
/// anonymous failures produced by winnow's token parsers).
#[derive(Debug)]
struct PErr {
    offset: usize,
    message: String,
}

impl<'a> ParserError<Input<'a>> for PErr {
    type Inner = Self;

    fn from_input(input: &Input<'a>) -> Self {
        PErr {
            offset: input.current_token_start(),
            message: String::new(),
        }
    }

    fn into_inner(self) -> Result<Self::Inner, Self> {
        Ok(self)
    }
}

const KEYWORDS: &[&str] = &["and", "or", "not", "in", "true", "false", "null"];

/// How deeply parentheses, `not` and `-` may nest: deeper is an error,
/// not a stack overflow.
pub const MAX_DEPTH: usize = 64;

thread_local! {
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// One level of nesting while it lives; `Err` past [`MAX_DEPTH`].
struct Nested;

impl Nested {
    fn enter(i: &Input<'_>) -> PResult<Nested> {
        let depth = DEPTH.with(|d| {
            d.set(d.get() + 1);
            d.get()
        });
        if depth > MAX_DEPTH {
            DEPTH.with(|d| d.set(d.get() - 1));
            return Err(PErr {
                offset: i.current_token_start(),
                message: format!("expression nested too deeply (more than {MAX_DEPTH} levels of parentheses, `not` or `-`)"),
            });
        }
        Ok(Nested)
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

const OPERAND_EXPECTED: &str =
    "expected an operand (a number, a string, true, false, null, a field path or `(`)";

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn fail_at<T>(i: &Input<'_>, expected: &str) -> PResult<T> {
    Err(PErr {
        offset: i.current_token_start(),
        message: format!("{expected}, found {}", describe_next(i)),
    })
}

/// A short description of what comes next in the input, for messages.
fn describe_next(i: &Input<'_>) -> String {
    let rest: &str = i;
    let Some(c) = rest.chars().next() else {
        return "end of expression".to_string();
    };
    let tok: &str = if is_ident_char(c) {
        let n = rest.find(|c: char| !is_ident_char(c)).unwrap_or(rest.len());
        &rest[..n]
    } else if "=!<>".contains(c) {
        let n = rest
            .find(|c: char| !"=!<>".contains(c))
            .unwrap_or(rest.len());
        &rest[..n]
    } else {
        &rest[..c.len_utf8()]
    };
    format!("`{tok}`")
}

fn ws(i: &mut Input<'_>) -> PResult<()> {
    take_while(0.., |c: char| c.is_whitespace())
        .void()
        .parse_next(i)
}

/// Matches a keyword that is not followed by an identifier character.
/// Consumes nothing and returns `false` when it does not match.
fn keyword(i: &mut Input<'_>, kw: &'static str) -> PResult<bool> {
    let cp = i.checkpoint();
    let matched = literal::<_, _, PErr>(kw).parse_next(i).is_ok()
        && !i.chars().next().is_some_and(is_ident_char);
    if !matched {
        i.reset(&cp);
    }
    Ok(matched)
}

/// Matches a punctuation literal; consumes nothing when it does not match.
fn punct(i: &mut Input<'_>, p: &'static str) -> bool {
    let cp = i.checkpoint();
    let ok = literal::<_, _, PErr>(p).parse_next(i).is_ok();
    if !ok {
        i.reset(&cp);
    }
    ok
}

/// Parses an expression: the whole of `src` must be one expression.
pub fn parse_expr(src: &str) -> Result<Expr, ExprError> {
    let mut input = LocatingSlice::new(src);
    let run = |i: &mut Input<'_>| -> PResult<Expr> {
        let (e, bare) = or_expr(i)?;
        ws(i)?;
        if !i.is_empty() {
            let expected = if bare {
                "expected a comparison operator, `and`, `or` or end of expression"
            } else {
                "expected `and`, `or` or end of expression"
            };
            return fail_at(i, expected);
        }
        Ok(e)
    };
    run(&mut input).map_err(|e| ExprError {
        offset: e.offset,
        message: if e.message.is_empty() {
            "syntax error".to_string()
        } else {
            e.message
        },
    })
}

/// Each level returns the expression plus whether its last element was a
/// bare operand (so a comparison operator could still have followed).
fn or_expr(i: &mut Input<'_>) -> PResult<(Expr, bool)> {
    let (first, mut bare) = and_expr(i)?;
    let mut items = vec![first];
    loop {
        ws(i)?;
        if !keyword(i, "or")? {
            break;
        }
        let (e, b) = and_expr(i)?;
        items.push(e);
        bare = b;
    }
    let e = if items.len() == 1 {
        items.pop().expect("one item")
    } else {
        Expr::Or(items)
    };
    Ok((e, bare))
}

fn and_expr(i: &mut Input<'_>) -> PResult<(Expr, bool)> {
    let (first, mut bare) = unary(i)?;
    let mut items = vec![first];
    loop {
        ws(i)?;
        if !keyword(i, "and")? {
            break;
        }
        let (e, b) = unary(i)?;
        items.push(e);
        bare = b;
    }
    let e = if items.len() == 1 {
        items.pop().expect("one item")
    } else {
        Expr::And(items)
    };
    Ok((e, bare))
}

fn unary(i: &mut Input<'_>) -> PResult<(Expr, bool)> {
    ws(i)?;
    if keyword(i, "not")? {
        let _nested = Nested::enter(i)?;
        let (e, bare) = unary(i)?;
        return Ok((Expr::Not(Box::new(e)), bare));
    }
    cmp(i)
}

fn cmp_op(i: &mut Input<'_>) -> Option<CmpOp> {
    const OPS: [(&str, CmpOp); 6] = [
        ("==", CmpOp::Eq),
        ("!=", CmpOp::Ne),
        (">=", CmpOp::Ge),
        ("<=", CmpOp::Le),
        (">", CmpOp::Gt),
        ("<", CmpOp::Lt),
    ];
    OPS.iter().find(|(s, _)| punct(i, s)).map(|(_, op)| *op)
}

fn cmp(i: &mut Input<'_>) -> PResult<(Expr, bool)> {
    let left = sum(i)?;
    ws(i)?;
    if let Some(op) = cmp_op(i) {
        ws(i)?;
        let right = sum(i)?;
        ws(i)?;
        let cp = i.checkpoint();
        let at = i.current_token_start();
        if cmp_op(i).is_some() {
            return Err(PErr {
                offset: at,
                message: "comparisons do not chain: write `a < b and b < c`".into(),
            });
        }
        i.reset(&cp);
        return Ok((Expr::Cmp(op, Box::new(left), Box::new(right)), false));
    }
    if keyword(i, "in")? {
        ws(i)?;
        if !punct(i, "[") {
            return fail_at(i, "expected `[` after `in`");
        }
        let mut list = Vec::new();
        loop {
            ws(i)?;
            list.push(list_literal(i)?);
            ws(i)?;
            if punct(i, ",") {
                continue;
            }
            if punct(i, "]") {
                break;
            }
            return fail_at(i, "expected `,` or `]`");
        }
        return Ok((Expr::In(Box::new(left), list), false));
    }
    Ok((left, true))
}

fn sum(i: &mut Input<'_>) -> PResult<Expr> {
    let mut e = product(i)?;
    loop {
        ws(i)?;
        let op = if punct(i, "+") {
            ArithOp::Add
        } else if punct(i, "-") {
            ArithOp::Sub
        } else {
            return Ok(e);
        };
        let right = product(i)?;
        e = Expr::Arith(op, Box::new(e), Box::new(right));
    }
}

fn product(i: &mut Input<'_>) -> PResult<Expr> {
    let mut e = operand(i)?;
    loop {
        ws(i)?;
        let op = if punct(i, "*") {
            ArithOp::Mul
        } else if punct(i, "/") {
            ArithOp::Div
        } else {
            return Ok(e);
        };
        let right = operand(i)?;
        e = Expr::Arith(op, Box::new(e), Box::new(right));
    }
}

/// `name(expr, "literal")` after the name and its `(`.
fn call(i: &mut Input<'_>, name: &str, name_at: usize) -> PResult<Expr> {
    let (arg, _) = or_expr(i)?;
    ws(i)?;
    if !punct(i, ",") {
        return fail_at(
            i,
            &format!("expected `,` and a string literal in `{name}(…)`"),
        );
    }
    ws(i)?;
    let lit_at = i.current_token_start();
    let lit = match i.chars().next() {
        Some('"') | Some('\'') => match string(i)? {
            Scalar::Str(s) => s,
            _ => unreachable!("string() returns strings"),
        },
        _ => {
            return fail_at(
                i,
                &format!("expected a string literal as the second argument of `{name}`"),
            )
        }
    };
    ws(i)?;
    if !punct(i, ")") {
        return fail_at(i, &format!("expected `)` to close `{name}(`"));
    }
    let test = match name {
        "starts_with" => StrTest::StartsWith(lit),
        "ends_with" => StrTest::EndsWith(lit),
        "contains" => StrTest::Contains(lit),
        "matches" => match regex::Regex::new(&lit) {
            Ok(r) => StrTest::Matches(r),
            Err(e) => {
                let first = e.to_string();
                let first = first.lines().last().unwrap_or("").trim();
                let first = first.strip_prefix("error: ").unwrap_or(first).to_string();
                return Err(PErr {
                    offset: lit_at,
                    message: format!("invalid regular expression: {first}"),
                });
            }
        },
        other => {
            return Err(PErr {
                offset: name_at,
                message: format!(
                    "unknown function `{other}`; expected one of: {}",
                    STR_TESTS.join(", ")
                ),
            })
        }
    };
    Ok(Expr::Call(test, Box::new(arg)))
}

fn list_literal(i: &mut Input<'_>) -> PResult<Scalar> {
    match i.chars().next() {
        Some('"') | Some('\'') => return string(i),
        Some(c) if c == '-' || c.is_ascii_digit() => return number(i),
        _ => {}
    }
    for (kw, v) in [
        ("true", Scalar::Bool(true)),
        ("false", Scalar::Bool(false)),
        ("null", Scalar::Null),
    ] {
        if keyword(i, kw)? {
            return Ok(v);
        }
    }
    fail_at(
        i,
        "expected a literal (a number, a string, true, false or null)",
    )
}

fn operand(i: &mut Input<'_>) -> PResult<Expr> {
    ws(i)?;
    let rest: &str = i;
    let mut chars = rest.chars();
    if chars.next() == Some('-') && !chars.next().is_some_and(|c| c.is_ascii_digit()) {
        let _nested = Nested::enter(i)?;
        any::<_, PErr>.parse_next(i)?;
        return Ok(Expr::Neg(Box::new(operand(i)?)));
    }
    match i.chars().next() {
        Some('"') | Some('\'') => return string(i).map(Expr::Lit),
        Some(c) if c == '-' || c.is_ascii_digit() => return number(i).map(Expr::Lit),
        Some('(') => {
            let _nested = Nested::enter(i)?;
            any::<_, PErr>.parse_next(i)?;
            let (e, bare) = or_expr(i)?;
            ws(i)?;
            if !punct(i, ")") {
                let expected = if bare {
                    "expected a comparison operator, `and`, `or` or `)` (a `(` is not closed)"
                } else {
                    "expected `and`, `or` or `)` (a `(` is not closed)"
                };
                return fail_at(i, expected);
            }
            return Ok(e);
        }
        _ => {}
    }
    for (kw, v) in [
        ("true", Scalar::Bool(true)),
        ("false", Scalar::Bool(false)),
        ("null", Scalar::Null),
    ] {
        if keyword(i, kw)? {
            return Ok(Expr::Lit(v));
        }
    }
    if i.chars().next().is_some_and(is_ident_start) {
        let cp = i.checkpoint();
        let name_at = i.current_token_start();
        if let Some(name) = ident(i)? {
            if punct(i, "(") {
                return call(i, name, name_at);
            }
        }
        i.reset(&cp);
        return path(i);
    }
    fail_at(i, OPERAND_EXPECTED)
}

/// Parses one identifier that is not a keyword; `None` (nothing consumed)
/// if the input does not start with one.
fn ident<'a>(i: &mut Input<'a>) -> PResult<Option<&'a str>> {
    let cp = i.checkpoint();
    let r: PResult<&'a str> = (
        take_while(1, is_ident_start),
        take_while(0.., is_ident_char),
    )
        .take()
        .parse_next(i);
    match r {
        Ok(s) if !KEYWORDS.contains(&s) => Ok(Some(s)),
        _ => {
            i.reset(&cp);
            Ok(None)
        }
    }
}

/// A path of three or more names as two: `group.a.b` is the field named
/// `a.b` of `group` (nested objects of Segment messages are flattened into
/// dotted names).
pub(crate) fn fold_path(mut parts: Vec<String>) -> Vec<String> {
    if parts.len() > 2 {
        let rest = parts.split_off(1).join(".");
        parts.push(rest);
    }
    parts
}

fn path(i: &mut Input<'_>) -> PResult<Expr> {
    let start = i.current_token_start();
    let Some(first) = ident(i)? else {
        return fail_at(i, OPERAND_EXPECTED);
    };
    let mut parts = vec![first.to_string()];
    while punct(i, ".") {
        match ident(i)? {
            Some(p) => parts.push(p.to_string()),
            None => return fail_at(i, "expected a field name after `.`"),
        }
    }
    let end = i.previous_token_end();
    Ok(Expr::Path(fold_path(parts), Span { start, end }))
}

fn number(i: &mut Input<'_>) -> PResult<Scalar> {
    let start = i.current_token_start();
    let text: &str = (
        take_while(0..=1, '-'),
        take_while(0.., |c: char| c.is_ascii_digit()),
    )
        .take()
        .parse_next(i)?;
    if text.len() == usize::from(text.starts_with('-')) {
        return fail_at(i, "expected digits");
    }
    let mut whole = text.to_string();
    if punct(i, ".") {
        let frac: &str = take_while(0.., |c: char| c.is_ascii_digit()).parse_next(i)?;
        if frac.is_empty() {
            return fail_at(i, "expected digits after `.`");
        }
        whole.push('.');
        whole.push_str(frac);
    }
    if !whole.contains('.') {
        // A duration: whole digits and a unit, in milliseconds.
        for (unit, ms) in [
            ("ms", 1.0),
            ("s", 1e3),
            ("m", 6e4),
            ("h", 3.6e6),
            ("d", 8.64e7),
        ] {
            let cp = i.checkpoint();
            if punct(i, unit) && !i.chars().next().is_some_and(is_ident_char) {
                let n: f64 = whole.parse().map_err(|_| PErr {
                    offset: start,
                    message: format!("invalid duration `{whole}{unit}`"),
                })?;
                return Ok(Scalar::Num(n * ms));
            }
            i.reset(&cp);
        }
    }
    if i.chars().next().is_some_and(is_ident_char) {
        return fail_at(
            i,
            "expected end of number (a duration is whole digits and ms, s, m, h or d, e.g. 30m)",
        );
    }
    whole.parse::<f64>().map(Scalar::Num).map_err(|_| PErr {
        offset: start,
        message: format!("invalid number `{whole}`"),
    })
}

fn string(i: &mut Input<'_>) -> PResult<Scalar> {
    let start = i.current_token_start();
    let quote: char = any.parse_next(i)?;
    let mut out = String::new();
    loop {
        let here = i.current_token_start();
        let c: char = match any::<_, PErr>.parse_next(i) {
            Ok(c) => c,
            Err(_) => {
                return Err(PErr {
                    offset: start,
                    message: format!("unterminated string: expected a closing `{quote}`"),
                })
            }
        };
        if c == quote {
            return Ok(Scalar::Str(out));
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        let e: char = match any::<_, PErr>.parse_next(i) {
            Ok(e) => e,
            Err(_) => {
                return Err(PErr {
                    offset: start,
                    message: format!("unterminated string: expected a closing `{quote}`"),
                })
            }
        };
        match e {
            '"' => out.push('"'),
            '\'' => out.push('\''),
            '\\' => out.push('\\'),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            other => {
                return Err(PErr {
                    offset: here,
                    message: format!(
                        "unknown escape `\\{other}`: expected one of \\\" \\' \\\\ \\n \\t (in a regular expression, write `\\\\{other}`)"
                    ),
                })
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------

fn ordering_ok(op: CmpOp, ord: Option<Ordering>) -> bool {
    match ord {
        None => op == CmpOp::Ne,
        Some(o) => match op {
            CmpOp::Eq => o == Ordering::Equal,
            CmpOp::Ne => o != Ordering::Equal,
            CmpOp::Ge => o != Ordering::Less,
            CmpOp::Le => o != Ordering::Greater,
            CmpOp::Gt => o == Ordering::Greater,
            CmpOp::Lt => o == Ordering::Less,
        },
    }
}

/// Compares two scalars with the language's semantics (see module docs).
pub fn compare(op: CmpOp, a: &Scalar, b: &Scalar) -> bool {
    compare_ref(op, a.borrowed(), b.borrowed())
}

/// [`compare`] on borrowed scalars.
pub fn compare_ref(op: CmpOp, a: ScalarRef, b: ScalarRef) -> bool {
    use ScalarRef::*;
    let ord = match (a, b) {
        (Null, _) | (_, Null) => {
            let both = matches!(a, Null) && matches!(b, Null);
            return match op {
                CmpOp::Eq => both,
                CmpOp::Ne => !both,
                _ => false,
            };
        }
        (Num(x), Num(y)) => x.partial_cmp(&y),
        (Str(x), Str(y)) => Some(x.cmp(y)),
        (Num(x), s @ Str(_)) => s.as_f64().and_then(|y| x.partial_cmp(&y)),
        (s @ Str(_), Num(y)) => s.as_f64().and_then(|x| x.partial_cmp(&y)),
        (Bool(x), Bool(y)) => Some(x.cmp(&y)),
        _ => None,
    };
    ordering_ok(op, ord)
}

impl Expr {
    /// Evaluates the expression; `env` resolves paths (missing = `Null`),
    /// borrowing from the record or profile it reads, so nothing is copied.
    /// `Not`, `And`, `Or`, `Cmp` and `In` yield `Bool`.
    pub fn eval<'a>(&'a self, env: &mut dyn FnMut(&[String]) -> ScalarRef<'a>) -> ScalarRef<'a> {
        match self {
            Expr::Lit(v) => v.borrowed(),
            Expr::Path(p, _) => env(p),
            Expr::Not(e) => ScalarRef::Bool(!e.eval_bool(env)),
            Expr::And(es) => ScalarRef::Bool(es.iter().all(|e| e.eval_bool(env))),
            Expr::Or(es) => ScalarRef::Bool(es.iter().any(|e| e.eval_bool(env))),
            Expr::Cmp(op, a, b) => {
                let a = a.eval(env);
                let b = b.eval(env);
                ScalarRef::Bool(compare_ref(*op, a, b))
            }
            Expr::In(a, list) => {
                let a = a.eval(env);
                ScalarRef::Bool(list.iter().any(|l| compare_ref(CmpOp::Eq, a, l.borrowed())))
            }
            Expr::Arith(op, a, b) => {
                let (a, b) = (a.eval(env).as_f64(), b.eval(env).as_f64());
                match (a, b) {
                    (Some(a), Some(b)) => op.apply(a, b).map_or(ScalarRef::Null, ScalarRef::Num),
                    _ => ScalarRef::Null,
                }
            }
            Expr::Neg(a) => a
                .eval(env)
                .as_f64()
                .map_or(ScalarRef::Null, |n| ScalarRef::Num(-n)),
            Expr::Call(test, a) => ScalarRef::Bool(match a.eval(env) {
                ScalarRef::Str(s) => test.test(s),
                _ => false,
            }),
        }
    }

    /// Whether the expression reads no path (its value is fixed).
    pub fn is_constant(&self) -> bool {
        self.paths().is_empty()
    }

    /// Evaluates and takes the truthiness of the result.
    pub fn eval_bool<'a>(&'a self, env: &mut dyn FnMut(&[String]) -> ScalarRef<'a>) -> bool {
        self.eval(env).truthy()
    }

    /// Every path in the expression with its span, in source order.
    pub fn paths(&self) -> Vec<(&[String], Span)> {
        let mut out = Vec::new();
        self.collect_paths(&mut out);
        out
    }

    fn collect_paths<'a>(&'a self, out: &mut Vec<(&'a [String], Span)>) {
        match self {
            Expr::Lit(_) => {}
            Expr::Path(p, s) => out.push((p.as_slice(), *s)),
            Expr::Not(e) => e.collect_paths(out),
            Expr::And(es) | Expr::Or(es) => es.iter().for_each(|e| e.collect_paths(out)),
            Expr::Cmp(_, a, b) => {
                a.collect_paths(out);
                b.collect_paths(out);
            }
            Expr::In(a, _) | Expr::Neg(a) | Expr::Call(_, a) => a.collect_paths(out),
            Expr::Arith(_, a, b) => {
                a.collect_paths(out);
                b.collect_paths(out);
            }
        }
    }
}

fn write_str_lit(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\t' => f.write_str("\\t")?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

fn write_lit(f: &mut fmt::Formatter<'_>, v: &Scalar) -> fmt::Result {
    match v {
        Scalar::Str(s) => write_str_lit(f, s),
        other => write!(f, "{other}"),
    }
}

/// Renders the expression back as (fully parenthesised) source text.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Lit(v) => write_lit(f, v),
            Expr::Path(p, _) => write!(f, "{}", p.join(".")),
            Expr::Not(e) => write!(f, "not ({e})"),
            Expr::And(es) | Expr::Or(es) => {
                let sep = if matches!(self, Expr::And(_)) {
                    " and "
                } else {
                    " or "
                };
                for (n, e) in es.iter().enumerate() {
                    if n > 0 {
                        f.write_str(sep)?;
                    }
                    write!(f, "({e})")?;
                }
                Ok(())
            }
            Expr::Cmp(op, a, b) => write!(f, "{a} {} {b}", op.as_str()),
            Expr::In(a, list) => {
                write!(f, "{a} in [")?;
                for (n, v) in list.iter().enumerate() {
                    if n > 0 {
                        f.write_str(", ")?;
                    }
                    write_lit(f, v)?;
                }
                f.write_str("]")
            }
            Expr::Arith(op, a, b) => write!(f, "({a} {} {b})", op.as_str()),
            Expr::Neg(a) => write!(f, "-({a})"),
            Expr::Call(test, a) => {
                write!(f, "{}({a}, ", test.name())?;
                write_str_lit(f, test.literal())?;
                f.write_str(")")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn p(src: &str) -> Expr {
        parse_expr(src).unwrap_or_else(|e| panic!("{src}: {e}"))
    }

    fn path(parts: &[&str], start: usize, end: usize) -> Expr {
        Expr::Path(
            parts.iter().map(|s| s.to_string()).collect(),
            Span { start, end },
        )
    }

    fn num(n: f64) -> Expr {
        Expr::Lit(Scalar::Num(n))
    }

    fn err(src: &str) -> ExprError {
        match parse_expr(src) {
            Ok(e) => panic!("{src} parsed as {e:?}"),
            Err(e) => e,
        }
    }

    fn eval_with(src: &str, vars: &[(&str, Scalar)]) -> bool {
        let map: HashMap<String, Scalar> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let mut env = |p: &[String]| {
            map.get(&p.join("."))
                .map_or(ScalarRef::Null, Scalar::borrowed)
        };
        p(src).eval_bool(&mut env)
    }

    #[test]
    fn precedence_not_and_or() {
        // a or b and not c  ==  a or (b and (not c))
        let e = p("a or b and not c");
        assert_eq!(
            e,
            Expr::Or(vec![
                path(&["a"], 0, 1),
                Expr::And(vec![
                    path(&["b"], 5, 6),
                    Expr::Not(Box::new(path(&["c"], 15, 16))),
                ]),
            ])
        );
        let e = p("not a == 1 and b");
        assert_eq!(
            e,
            Expr::And(vec![
                Expr::Not(Box::new(Expr::Cmp(
                    CmpOp::Eq,
                    Box::new(path(&["a"], 4, 5)),
                    Box::new(num(1.0))
                ))),
                path(&["b"], 15, 16),
            ])
        );
    }

    #[test]
    fn parentheses() {
        let e = p("(a or b) and c");
        assert_eq!(
            e,
            Expr::And(vec![
                Expr::Or(vec![path(&["a"], 1, 2), path(&["b"], 6, 7)]),
                path(&["c"], 13, 14),
            ])
        );
        assert!(!eval_with("(a or b) and c", &[("a", Scalar::Bool(true))]));
        assert!(eval_with("a or b and c", &[("a", Scalar::Bool(true))]));
        assert_eq!(p("((x))"), path(&["x"], 2, 3));
    }

    #[test]
    fn all_operators() {
        for (s, op) in [
            ("==", CmpOp::Eq),
            ("!=", CmpOp::Ne),
            (">=", CmpOp::Ge),
            ("<=", CmpOp::Le),
            (">", CmpOp::Gt),
            ("<", CmpOp::Lt),
        ] {
            let src = format!("x{s}2");
            let end = 1;
            assert_eq!(
                p(&src),
                Expr::Cmp(op, Box::new(path(&["x"], 0, end)), Box::new(num(2.0))),
                "{src}"
            );
        }
        let x = |v: f64| vec![("x", Scalar::Num(v))];
        assert!(eval_with("x == 2", &x(2.0)));
        assert!(!eval_with("x == 2", &x(3.0)));
        assert!(eval_with("x != 2", &x(3.0)));
        assert!(eval_with("x >= 2", &x(2.0)));
        assert!(!eval_with("x >= 2", &x(1.0)));
        assert!(eval_with("x <= 2", &x(2.0)));
        assert!(eval_with("x > 2", &x(2.5)));
        assert!(!eval_with("x > 2", &x(2.0)));
        assert!(eval_with("x < 2", &x(-1.0)));
    }

    #[test]
    fn numbers() {
        assert_eq!(p("100"), num(100.0));
        assert_eq!(p("2.5"), num(2.5));
        assert_eq!(p("-3"), num(-3.0));
        assert_eq!(
            p("a>-3"),
            Expr::Cmp(CmpOp::Gt, Box::new(path(&["a"], 0, 1)), Box::new(num(-3.0)))
        );
        assert_eq!(err("1.").offset, 2);
        assert_eq!(err("-").offset, 1);
        assert_eq!(err("12ab").offset, 2);
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(
            p(r#""a\"b\\c\nd""#),
            Expr::Lit(Scalar::Str("a\"b\\c\nd".into()))
        );
        assert_eq!(p(r"'it\'s'"), Expr::Lit(Scalar::Str("it's".into())));
        assert_eq!(
            p(r#"'say "hi"'"#),
            Expr::Lit(Scalar::Str("say \"hi\"".into()))
        );
        assert_eq!(p("'é'"), Expr::Lit(Scalar::Str("é".into())));
        let e = err(r#"a == "x\qy""#);
        assert_eq!(e.offset, 7);
        assert!(e.message.contains("unknown escape"), "{}", e.message);
        let e = err(r#"a == "abc"#);
        assert_eq!(e.offset, 5);
        assert!(e.message.contains("unterminated"), "{}", e.message);
    }

    #[test]
    fn literals_and_paths() {
        assert_eq!(p("true"), Expr::Lit(Scalar::Bool(true)));
        assert_eq!(p("false"), Expr::Lit(Scalar::Bool(false)));
        assert_eq!(p("null"), Expr::Lit(Scalar::Null));
        assert_eq!(p("  item.price_2 "), path(&["item", "price_2"], 2, 14));
        assert_eq!(p("truely"), path(&["truely"], 0, 6));
        // A longer path is a field whose name holds dots.
        assert_eq!(p("_x.y.z"), path(&["_x", "y.z"], 0, 6));
        let e = err("item.");
        assert_eq!(e.offset, 5);
        let e = err("item.in");
        assert_eq!(e.offset, 5);
        let e = err("and");
        assert_eq!(e.offset, 0);
        assert!(e.message.contains("found `and`"), "{}", e.message);
    }

    #[test]
    fn in_lists() {
        let e = p(r#"event in ["a", 'b', 3, true, null]"#);
        assert_eq!(
            e,
            Expr::In(
                Box::new(path(&["event"], 0, 5)),
                vec![
                    Scalar::Str("a".into()),
                    Scalar::Str("b".into()),
                    Scalar::Num(3.0),
                    Scalar::Bool(true),
                    Scalar::Null
                ]
            )
        );
        assert_eq!(
            p("x in[1]"),
            Expr::In(Box::new(path(&["x"], 0, 1)), vec![Scalar::Num(1.0)])
        );
        assert!(eval_with(
            "c in ['US', 'CA']",
            &[("c", Scalar::Str("CA".into()))]
        ));
        assert!(!eval_with(
            "c in ['US', 'CA']",
            &[("c", Scalar::Str("MX".into()))]
        ));
        assert!(eval_with("c in [1, 2]", &[("c", Scalar::Str("2".into()))]));
        assert!(eval_with("c in [null]", &[]));
        assert!(eval_with("not c in [1]", &[]));
        assert_eq!(err("x in 1").offset, 5);
        assert_eq!(err("x in []").offset, 6);
        assert_eq!(err("x in [1 2]").offset, 8);
        assert_eq!(err("x in [y]").offset, 6);
    }

    #[test]
    fn comparison_semantics() {
        let n = |v: f64| Scalar::Num(v);
        let s = |v: &str| Scalar::Str(v.into());
        assert!(compare(CmpOp::Lt, &s("abc"), &s("abd")));
        assert!(compare(CmpOp::Gt, &s("b"), &s("abc")));
        assert!(compare(CmpOp::Eq, &n(10.0), &s("10")));
        assert!(compare(CmpOp::Gt, &s("10"), &n(9.0)));
        assert!(!compare(CmpOp::Eq, &n(10.0), &s("ten")));
        assert!(compare(CmpOp::Ne, &n(10.0), &s("ten")));
        assert!(!compare(CmpOp::Lt, &n(10.0), &s("ten")));
        assert!(compare(CmpOp::Eq, &Scalar::Null, &Scalar::Null));
        assert!(!compare(CmpOp::Eq, &n(0.0), &Scalar::Null));
        assert!(compare(CmpOp::Ne, &n(0.0), &Scalar::Null));
        assert!(!compare(CmpOp::Ne, &Scalar::Null, &Scalar::Null));
        assert!(!compare(CmpOp::Ge, &Scalar::Null, &Scalar::Null));
        assert!(!compare(CmpOp::Lt, &Scalar::Null, &n(1.0)));
        assert!(!compare(CmpOp::Gt, &n(1.0), &Scalar::Null));
        assert!(compare(CmpOp::Eq, &Scalar::Bool(true), &Scalar::Bool(true)));
        assert!(compare(
            CmpOp::Gt,
            &Scalar::Bool(true),
            &Scalar::Bool(false)
        ));
        assert!(!compare(CmpOp::Eq, &Scalar::Bool(true), &n(1.0)));
        assert!(compare(CmpOp::Ne, &Scalar::Bool(true), &n(1.0)));
    }

    #[test]
    fn eval_with_env() {
        let vars = vec![
            ("event", Scalar::Str("view_item".into())),
            ("item.price", Scalar::Num(120.0)),
        ];
        assert!(eval_with(
            r#"event == "view_item" and item.price >= 100"#,
            &vars
        ));
        assert!(!eval_with(
            r#"event == "view_item" and item.price >= 200"#,
            &vars
        ));
        assert!(eval_with("missing == null", &vars));
        assert!(!eval_with("missing > 0", &vars));
        assert!(eval_with("item.price", &vars));
        assert!(!eval_with("missing", &vars));
        assert_eq!(
            p("1 < 2").eval(&mut |_| ScalarRef::Null),
            ScalarRef::Bool(true)
        );
        assert_eq!(
            p("x").eval(&mut |_| ScalarRef::Num(7.0)),
            ScalarRef::Num(7.0)
        );
    }

    #[test]
    fn paths_in_source_order() {
        let e = p("a.b > 1 and (c in [1] or not d == e.f)");
        let ps: Vec<(String, Span)> = e
            .paths()
            .into_iter()
            .map(|(p, s)| (p.join("."), s))
            .collect();
        assert_eq!(
            ps,
            vec![
                ("a.b".to_string(), Span { start: 0, end: 3 }),
                ("c".to_string(), Span { start: 13, end: 14 }),
                ("d".to_string(), Span { start: 29, end: 30 }),
                ("e.f".to_string(), Span { start: 34, end: 37 }),
            ]
        );
    }

    #[test]
    fn error_offsets() {
        let e = err("a >= ");
        assert_eq!(e.offset, 5);
        assert!(
            e.message.starts_with("expected an operand"),
            "{}",
            e.message
        );
        assert!(
            e.message.ends_with("found end of expression"),
            "{}",
            e.message
        );

        let e = err("a = 1");
        assert_eq!(e.offset, 2);
        assert_eq!(
            e.message,
            "expected a comparison operator, `and`, `or` or end of expression, found `=`"
        );

        let e = err("(a > 1");
        assert_eq!(e.offset, 6);
        assert!(e.message.contains("`)`"), "{}", e.message);

        let e = err("a > 1 > 2");
        assert_eq!(e.offset, 6);
        assert_eq!(
            e.message,
            "comparisons do not chain: write `a < b and b < c`"
        );
        // Deep nesting is an error, not a stack overflow.
        let deep = format!("{}x{}", "(".repeat(5000), ")".repeat(5000));
        assert!(err(&deep).message.contains("nested too deeply"));
        let nots = format!("{}x", "not ".repeat(5000));
        assert!(err(&nots).message.contains("nested too deeply"));
        assert_eq!(
            p(&format!("{}x{}", "(".repeat(60), ")".repeat(60))),
            path(&["x"], 60, 61)
        );

        assert_eq!(err("").offset, 0);
        assert_eq!(err("a and").offset, 5);
        assert_eq!(err("a or or b").offset, 5);
        assert_eq!(err("not").offset, 3);
        assert_eq!(err("a == 1 )").offset, 7);
        assert_eq!(err("a @ 1").offset, 2);
    }

    #[test]
    fn display_round_trips() {
        for src in [
            r#"event == "view_item" and item.price >= 100"#,
            "not (a or b) and c in [1, 'x\\n', null]",
            "x != -2.5",
        ] {
            let e = p(src);
            let again = p(&e.to_string());
            // spans differ, so compare the rendering
            assert_eq!(e.to_string(), again.to_string());
        }
    }
}
