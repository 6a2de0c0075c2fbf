//! Subscriptions: decisions and segment changes as they happen. Each subscriber reads
//! its own bounded broadcast receiver; one that falls behind skips ahead and never slows
//! the producer.

use async_graphql::{Context, Subscription, ID};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;

use super::auth::Allow;
use super::engine;
use super::types::{DecisionObject, SegmentChangeObject};

#[derive(Default)]
pub struct Subscription;

#[Subscription]
impl Subscription {
    /// Decisions as they are made, optionally only for one placement or customer.
    #[graphql(guard = "Allow::INTERNAL")]
    async fn decisions(
        &self,
        ctx: &Context<'_>,
        placement: Option<String>,
        customer_id: Option<ID>,
    ) -> impl Stream<Item = DecisionObject> {
        BroadcastStream::new(engine(ctx).decisions.subscribe()).filter_map(move |d| {
            let keep = d.ok().filter(|d| {
                placement
                    .as_ref()
                    .is_none_or(|p| d.placement.as_ref() == Some(p))
                    && customer_id
                        .as_ref()
                        .is_none_or(|c| d.customer_id.as_str() == c.as_str())
            });
            async move { keep.map(DecisionObject) }
        })
    }

    /// Joins and leaves, optionally of one segment.
    #[graphql(guard = "Allow::INTERNAL")]
    async fn segment_changes(
        &self,
        ctx: &Context<'_>,
        segment: Option<String>,
    ) -> impl Stream<Item = SegmentChangeObject> {
        BroadcastStream::new(engine(ctx).segments.subscribe()).filter_map(move |c| {
            let keep = c
                .ok()
                .filter(|c| segment.as_ref().is_none_or(|s| &c.segment == s));
            async move { keep.map(Into::into) }
        })
    }
}
