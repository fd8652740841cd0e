//! The messages that carry codes: built-in templates from `config/templates/`, or replacements
//! from `email.templates_dir`.

use std::path::Path;

const TEXT: &str = include_str!("../../../config/templates/verification.txt");
const HTML: &str = include_str!("../../../config/templates/verification.html");

/// Values a template may use.
#[derive(Debug)]
pub struct Vars<'a> {
    pub server_name: &'a str,
    pub code: &'a str,
    pub link: &'a str,
    pub minutes: u64,
    pub purpose: &'a str,
}

#[derive(Debug, Clone)]
pub struct Templates {
    text: String,
    html: String,
}

impl Default for Templates {
    fn default() -> Self {
        Self { text: TEXT.to_owned(), html: HTML.to_owned() }
    }
}

fn escape_html(value: &str) -> String {
    value.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn render(template: &str, vars: &Vars<'_>, escape: fn(&str) -> String) -> String {
    template
        .replace("{server_name}", &escape(vars.server_name))
        .replace("{code}", &escape(vars.code))
        .replace("{link}", &escape(vars.link))
        .replace("{minutes}", &vars.minutes.to_string())
        .replace("{purpose}", &escape(vars.purpose))
}

impl Templates {
    /// The built-in templates, or those in `dir` when it is set.
    pub fn load(dir: &str) -> std::io::Result<Self> {
        if dir.is_empty() {
            return Ok(Self::default());
        }
        let dir = Path::new(dir);
        Ok(Self {
            text: std::fs::read_to_string(dir.join("verification.txt"))?,
            html: std::fs::read_to_string(dir.join("verification.html"))?,
        })
    }

    pub fn text(&self, vars: &Vars<'_>) -> String {
        render(&self.text, vars, str::to_owned)
    }

    pub fn html(&self, vars: &Vars<'_>) -> String {
        render(&self.html, vars, escape_html)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_escapes() {
        let vars = Vars {
            server_name: "ex<am>ple.org",
            code: "123456",
            link: "https://h/x?a=1&b=2",
            minutes: 10,
            purpose: "to sign in",
        };
        let templates = Templates::default();
        let text = templates.text(&vars);
        assert!(
            text.contains("123456") && text.contains("https://h/x?a=1&b=2") && text.contains("10 minutes")
        );
        let html = templates.html(&vars);
        assert!(html.contains("ex&lt;am&gt;ple.org") && html.contains("a=1&amp;b=2"));
        assert!(!html.contains('{'), "every placeholder is filled");
    }
}
