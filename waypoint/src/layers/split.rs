//! Weighted choice between a route's backends (`backendRefs[].weight`).

use std::sync::Arc;
use std::task::{Context, Poll};

use rand::Rng;
use tower::Service;

use super::{BoxFuture, ProxyResult, ProxyService, context_of};
use crate::body::Request;
use crate::error::ProxyError;

/// One weighted target of a [`WeightedSplit`].
#[derive(Clone)]
pub struct WeightedBackend {
    /// The backend's name (recorded in the [`RequestContext`](super::RequestContext) for metrics).
    pub name: Arc<str>,
    /// Relative weight; 0 never chosen.
    pub weight: u32,
    /// The backend's service.
    pub service: ProxyService,
}

/// Sends each request to one backend, chosen at random in proportion to the weights.
#[derive(Clone)]
pub struct WeightedSplit {
    backends: Arc<[WeightedBackend]>,
    total: u64,
    /// With a single backend: its name and service, called directly (no roll, no clone).
    single: Option<(Arc<str>, ProxyService)>,
}

impl WeightedSplit {
    /// A split over `backends`; `None` when every weight is 0 (config validation rejects that).
    pub fn new(backends: Vec<WeightedBackend>) -> Option<Self> {
        let backends: Vec<_> = backends.into_iter().filter(|b| b.weight > 0).collect();
        let total = backends.iter().map(|b| u64::from(b.weight)).sum();
        let single = match backends.as_slice() {
            [only] => Some((only.name.clone(), only.service.clone())),
            _ => None,
        };
        (total > 0).then(|| WeightedSplit {
            backends: backends.into(),
            total,
            single,
        })
    }

    fn pick(&self, roll: u64) -> &WeightedBackend {
        let mut left = roll;
        for backend in self.backends.iter() {
            if left < u64::from(backend.weight) {
                return backend;
            }
            left -= u64::from(backend.weight);
        }
        &self.backends[self.backends.len() - 1]
    }
}

impl Service<Request> for WeightedSplit {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if let Some((name, service)) = &mut self.single {
            if let Some(context) = context_of(&request) {
                context.set_backend(name.clone());
            }
            // Always ready (see the module docs).
            return service.call(request);
        }
        let roll = rand::rng().random_range(0..self.total);
        let backend = self.pick(roll);
        if let Some(context) = context_of(&request) {
            context.set_backend(backend.name.clone());
        }
        backend.service.call_shared(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::RequestContext;
    use crate::layers::testing::{request, status_service};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    #[tokio::test]
    async fn split_follows_weights_within_tolerance() {
        let counts: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let weights = [70, 20, 10];
        let split = WeightedSplit::new(
            (0..3)
                .map(|i| WeightedBackend {
                    name: format!("b{i}").into(),
                    weight: weights[i],
                    service: status_service(200, counts[i].clone()),
                })
                .collect(),
        )
        .expect("weights");
        let n = 10_000;
        for _ in 0..n {
            split.clone().oneshot(request("/")).await.expect("response");
        }
        for (i, count) in counts.iter().enumerate() {
            let share = count.load(Ordering::SeqCst) as f64 / n as f64;
            let expected = f64::from(weights[i]) / 100.0;
            assert!(
                (share - expected).abs() < 0.02,
                "backend {i}: share {share} vs {expected}"
            );
        }
    }

    #[tokio::test]
    async fn zero_weight_gets_nothing_and_context_records_backend() {
        let never = Arc::new(AtomicUsize::new(0));
        let always = Arc::new(AtomicUsize::new(0));
        let split = WeightedSplit::new(vec![
            WeightedBackend {
                name: "never".into(),
                weight: 0,
                service: status_service(200, never.clone()),
            },
            WeightedBackend {
                name: "always".into(),
                weight: 5,
                service: status_service(200, always.clone()),
            },
        ])
        .expect("weights");
        let context = RequestContext::default();
        for _ in 0..100 {
            let mut req = request("/");
            req.extensions_mut().insert(context.clone());
            split.clone().oneshot(req).await.expect("response");
        }
        assert_eq!(never.load(Ordering::SeqCst), 0);
        assert_eq!(always.load(Ordering::SeqCst), 100);
        assert_eq!(context.backend().as_deref(), Some("always"));
        assert!(WeightedSplit::new(vec![]).is_none());
    }
}
