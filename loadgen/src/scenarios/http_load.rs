//! `loadgen http`: one URL, the same request every time (clicks, the ceiling
//! servers, the report query), from one visitor or, with `--visitors`, from
//! many (each its own user agent, so a click service tells them apart).

use http::{HeaderValue, StatusCode};

use crate::{
    cli::HttpArgs,
    error::{BenchError, BoxError},
    http::{bearer, Req, Target},
    load::{self, Plan},
    results, service,
};

struct Fixed {
    target: Target,
    path: String,
    bearer: Option<HeaderValue>,
    expected: StatusCode,
    /// 0: one user agent for every request; else request `i` comes from
    /// visitor `i % visitors` (its own user agent).
    visitors: u64,
}

impl Plan for Fixed {
    fn request(&self, i: u64) -> Result<Req, BoxError> {
        let mut req = self.target.get(&self.path, self.bearer.as_ref())?;
        if self.visitors > 0 {
            let agent = format!("{} visitor/{}", crate::http::USER_AGENT, i % self.visitors);
            req.headers_mut()
                .insert(http::header::USER_AGENT, HeaderValue::try_from(agent)?);
        }
        Ok(req)
    }

    fn expected(&self) -> StatusCode {
        self.expected
    }
}

/// Runs the load and appends its measurement.
///
/// # Errors
/// Bad arguments, or the results file cannot be written.
pub async fn run(args: HttpArgs, id: &str) -> Result<(), BenchError> {
    let (target, path) = Target::from_url(&args.url)?;
    let expected = StatusCode::from_u16(args.expect)
        .map_err(|_| BenchError::Usage(format!("--expect {} is not a status", args.expect)))?;
    let plan = Fixed {
        target: target.clone(),
        path,
        bearer: args.bearer.as_deref().map(bearer).transpose()?,
        expected,
        visitors: args.visitors,
    };
    plan.request(0)
        .map_err(|e| BenchError::Usage(format!("{}: {e}", args.url)))?;
    let mode = super::mode(&args.load, &args.out.results)?;
    let config = super::load_config(id, target, mode, &args.load, &args.out.watch);
    let outcome = load::run(config, plan).await;
    let mut m = super::measurement(id, &args.title, &outcome, mode, args.load.connections)
        .extra("url", args.url.as_str())
        .extra("visitors", args.visitors);
    if !args.settle.is_empty() {
        let started = std::time::Instant::now();
        for addr in &args.settle {
            service::wait_at_tail(&Target::new(addr)?, args.settle_timeout).await?;
        }
        let settled = started.elapsed().as_secs_f64();
        m = m.extra("folds_settled_s", (settled * 10.0).round() / 10.0);
    }
    results::append(&args.out.results, &m)
}
