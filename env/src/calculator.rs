//! The `calculator` tool: an arithmetic expression evaluator (no code is executed).
//!
//! Grammar (usual precedence, `^` and `**` right-associative):
//!
//!   expr   = term   (("+" | "-") term)*
//!   term   = unary  (("*" | "/" | "%") unary)*
//!   unary  = ("-" | "+") unary | power
//!   power  = atom   (("^" | "**") unary)?
//!   atom   = number | "(" expr ")"
//!
//! Numbers are decimals (`12`, `3.5`, `.5`, `1e3`); whitespace and `,` between digit
//! groups (`1,234`) are ignored. Bounded: at most [`MAX_CHARS`] characters and
//! [`MAX_DEPTH`] nested parentheses; a non-finite result (division by zero, overflow)
//! is an error.

/// The longest expression evaluated.
pub const MAX_CHARS: usize = 256;
/// The deepest nesting of parentheses and unary signs.
pub const MAX_DEPTH: usize = 32;

/// Evaluates `expr`; the error says what is wrong and where.
pub fn evaluate(expr: &str) -> Result<f64, String> {
    if expr.chars().count() > MAX_CHARS {
        return Err(format!(
            "the expression is longer than {MAX_CHARS} characters"
        ));
    }
    let chars: Vec<char> = expr.chars().filter(|c| !c.is_whitespace()).collect();
    if chars.is_empty() {
        return Err("the expression is empty".into());
    }
    let mut p = Parser { s: chars, i: 0 };
    let v = p.expr(0)?;
    if p.i < p.s.len() {
        return Err(format!("unexpected '{}' at position {}", p.s[p.i], p.i + 1));
    }
    if v.is_finite() {
        Ok(v)
    } else {
        Err("the result is not a finite number (division by zero or overflow)".into())
    }
}

/// A result as the tool reports it: an integer without a fractional part when it is one
/// (and exactly representable), otherwise up to 12 significant digits.
pub fn format(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.12}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}

struct Parser {
    s: Vec<char>,
    i: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn deeper(depth: usize) -> Result<usize, String> {
        if depth >= MAX_DEPTH {
            Err(format!("nested deeper than {MAX_DEPTH}"))
        } else {
            Ok(depth + 1)
        }
    }

    fn expr(&mut self, depth: usize) -> Result<f64, String> {
        let mut v = self.term(depth)?;
        loop {
            if self.eat('+') {
                v += self.term(depth)?;
            } else if self.eat('-') {
                v -= self.term(depth)?;
            } else {
                return Ok(v);
            }
        }
    }

    fn term(&mut self, depth: usize) -> Result<f64, String> {
        let mut v = self.unary(depth)?;
        loop {
            if self.peek() == Some('*') && self.s.get(self.i + 1) != Some(&'*') {
                self.i += 1;
                v *= self.unary(depth)?;
            } else if self.eat('/') {
                let d = self.unary(depth)?;
                if d == 0.0 {
                    return Err("division by zero".into());
                }
                v /= d;
            } else if self.eat('%') {
                let d = self.unary(depth)?;
                if d == 0.0 {
                    return Err("modulo by zero".into());
                }
                v %= d;
            } else {
                return Ok(v);
            }
        }
    }

    fn power(&mut self, depth: usize) -> Result<f64, String> {
        let base = self.atom(depth)?;
        let pow = if self.eat('^') {
            true
        } else if self.peek() == Some('*') && self.s.get(self.i + 1) == Some(&'*') {
            self.i += 2;
            true
        } else {
            false
        };
        if pow {
            let e = self.unary(Self::deeper(depth)?)?;
            Ok(base.powf(e))
        } else {
            Ok(base)
        }
    }

    fn unary(&mut self, depth: usize) -> Result<f64, String> {
        if self.eat('-') {
            return Ok(-self.unary(Self::deeper(depth)?)?);
        }
        if self.eat('+') {
            return self.unary(Self::deeper(depth)?);
        }
        self.power(depth)
    }

    fn atom(&mut self, depth: usize) -> Result<f64, String> {
        if self.eat('(') {
            let v = self.expr(Self::deeper(depth)?)?;
            if !self.eat(')') {
                return Err(match self.peek() {
                    Some(c) => format!("expected ')' at position {}, found '{c}'", self.i + 1),
                    None => "a '(' is not closed".into(),
                });
            }
            return Ok(v);
        }
        self.number()
    }

    fn number(&mut self) -> Result<f64, String> {
        let start = self.i;
        let mut text = String::new();
        let mut digits = 0;
        while let Some(c) = self.peek() {
            if c.is_ascii_digit() {
                digits += 1;
                text.push(c);
            } else if c == '.' {
                text.push(c);
            } else if c == ','
                && digits > 0
                && self.s.get(self.i + 1).is_some_and(char::is_ascii_digit)
            {
                // A thousands separator.
            } else if (c == 'e' || c == 'E') && digits > 0 {
                text.push('e');
                self.i += 1;
                if let Some(sign @ ('+' | '-')) = self.peek() {
                    text.push(sign);
                    self.i += 1;
                }
                continue;
            } else {
                break;
            }
            self.i += 1;
        }
        if digits == 0 {
            return Err(match self.s.get(start) {
                Some(c) => format!("expected a number at position {}, found '{c}'", start + 1),
                None => "the expression ends where a number is expected".into(),
            });
        }
        text.parse::<f64>()
            .map_err(|_| format!("'{text}' at position {} is not a number", start + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluates_with_precedence() {
        for (e, want) in [
            ("2+3*4", 14.0),
            ("(2+3)*4", 20.0),
            ("347 * 86", 29842.0),
            ("-3^2", -9.0),
            ("2^3^2", 512.0),
            ("2**10", 1024.0),
            ("2^-1", 0.5),
            ("10 / 4", 2.5),
            ("17 % 5", 2.0),
            ("1,234 + 1", 1235.0),
            ("1e3 - .5", 999.5),
            ("--4", 4.0),
            ("((((1))))", 1.0),
        ] {
            assert_eq!(evaluate(e), Ok(want), "{e}");
        }
        assert_eq!(format(29842.0), "29842");
        assert_eq!(format(2.5), "2.5");
        assert_eq!(format(1.0 / 3.0), "0.333333333333");
        assert_eq!(format(-4.0), "-4");
    }

    #[test]
    fn bad_expressions_say_why() {
        for (e, needle) in [
            ("", "empty"),
            ("2 +", "ends where a number"),
            ("2 * (3", "not closed"),
            ("1/0", "division by zero"),
            ("2 x 3", "unexpected 'x'"),
            ("import os", "expected a number"),
            ("10^400", "not a finite"),
            (&"(".repeat(40), "nested deeper"),
            (&"1+".repeat(200), "longer than"),
        ] {
            let err = evaluate(e).unwrap_err();
            assert!(err.contains(needle), "{e:?}: {err}");
        }
    }
}
