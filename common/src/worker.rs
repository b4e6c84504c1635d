//! A fold's own OS thread, at a lower CPU priority than the threads that answer
//! requests.
//!
//! A fold applies a group of events in one burst of CPU (tens of milliseconds
//! for a group of 1024 clicks). On a small machine that burst took a core from
//! the threads answering redirects and postbacks, whose wait for it was the tail
//! of their latency. A fold is behind the log by design and catches up when the
//! burst of requests has passed, so once it has caught up with the log it
//! yields: its thread's nice value is raised ([`Worker::lower_priority`]).
//! Until then (a start, a rebuild: the service is not ready and folding is all
//! it has to do) it runs at the priority it was started with. Niceness only
//! matters when the cores are all busy; an idle machine gives the fold all it
//! asks for.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
};

use thiserror::Error;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// The worker thread could not run a job.
#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("the worker thread could not be started")]
    Spawn(#[source] std::io::Error),
    #[error("the job panicked or the worker thread has stopped")]
    Gone,
}

/// One OS thread running the jobs given to it, in order.
#[derive(Debug)]
pub struct Worker {
    jobs: mpsc::Sender<Job>,
    nice: i32,
    lowered: AtomicBool,
}

impl Worker {
    /// Starts a thread named `name`, at the caller's priority; `nice` is what
    /// [`Worker::lower_priority`] will add to its nice value. The thread ends
    /// when the worker is dropped.
    ///
    /// # Errors
    /// The OS cannot start a thread.
    pub fn spawn(name: &str, nice: i32) -> Result<Self, WorkerError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                for job in queue {
                    // A panicking job drops its reply sender: the caller sees
                    // `Gone`, and the thread goes on with the next job.
                    let _ = catch_unwind(AssertUnwindSafe(job));
                }
            })
            .map_err(WorkerError::Spawn)?;
        Ok(Self {
            jobs,
            nice,
            lowered: AtomicBool::new(false),
        })
    }

    /// Raises the thread's nice value by the worker's `nice`, once (later
    /// calls do nothing: without privileges a thread cannot take priority
    /// back). Jobs given after this call run at the new priority. Linux only,
    /// where nice is a thread's own; a value the system refuses is logged and
    /// the thread keeps its priority.
    pub fn lower_priority(&self) {
        if self.nice == 0 || self.lowered.swap(true, Ordering::Relaxed) {
            return;
        }
        let nice = self.nice;
        let _ = self.jobs.send(Box::new(move || raise_nice(nice)));
    }

    /// Runs `job` on the thread and waits for its result.
    ///
    /// # Errors
    /// [`WorkerError::Gone`]: the job panicked.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, WorkerError> {
        self.start(job).await
    }

    /// Queues `job` on the thread at once; the future returned resolves to
    /// its result (dropping it does not stop the job).
    pub fn start<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, WorkerError>> + Send + 'static {
        let (reply, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(job());
        });
        let queued = self.jobs.send(job).is_ok();
        async move {
            if !queued {
                return Err(WorkerError::Gone);
            }
            result.await.map_err(|_| WorkerError::Gone)
        }
    }
}

/// Raises the calling thread's nice value by `nice`.
fn raise_nice(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let tid = Some(rustix::thread::gettid());
        let now = getpriority_process(tid).unwrap_or(0);
        if let Err(error) = setpriority_process(tid, now.saturating_add(nice)) {
            tracing::warn!(%error, nice, "could not lower a fold thread's priority");
        }
    }
}

/// The calling thread's nice value (Linux; 0 elsewhere).
#[cfg(test)]
fn current_nice() -> i32 {
    #[cfg(target_os = "linux")]
    return rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(0);
    #[cfg(not(target_os = "linux"))]
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_in_order_on_a_thread_of_its_own_then_at_the_nice_asked() {
        let worker = Worker::spawn("test-worker", 3).unwrap();
        let here = std::thread::current().id();
        let base = current_nice();
        let (name, id) = worker
            .run(|| {
                let me = std::thread::current();
                (me.name().map(str::to_owned), me.id())
            })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("test-worker"));
        assert_ne!(id, here);
        assert_eq!(worker.run(current_nice).await.unwrap(), base);
        worker.lower_priority();
        worker.lower_priority();
        if cfg!(target_os = "linux") {
            assert_eq!(worker.run(current_nice).await.unwrap(), (base + 3).min(19));
        }
        let mut seen = Vec::new();
        for i in 0..5 {
            seen.push(worker.run(move || i * 2).await.unwrap());
        }
        assert_eq!(seen, [0, 2, 4, 6, 8]);
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_the_thread_goes_on() {
        let worker = Worker::spawn("test-worker", 0).unwrap();
        let failed = worker.run(|| -> u8 { panic!("boom") }).await;
        assert!(matches!(failed, Err(WorkerError::Gone)));
        assert_eq!(worker.run(|| 7).await.unwrap(), 7);
    }
}
