//! ListLocks: paging through held locks, without duplicates, omissions or tokens.

use std::collections::HashSet;

use lockd_client::proto::ListLocksRequest;

use crate::support::*;

crate::conformance_ha! {
    async fn list_pages_through_ten_thousand_locks_without_duplicates_or_omissions(store: Store) {
        let s = Setup::new(store).await;
        let mut tasks = Vec::new();
        for t in 0..16 {
            let mut c = s.client().await;
            tasks.push(tokio::spawn(async move {
                let mut tokens = Vec::new();
                for i in (t..10_000).step_by(16) {
                    tokens.push(acquire_ok(&mut c, &format!("batch/{i:05}"), 300.0).await.token);
                }
                tokens
            }));
        }
        let mut tokens = HashSet::new();
        for t in tasks {
            tokens.extend(t.await.unwrap());
        }
        let mut c = s.client().await;
        // Locks outside the prefix are not listed.
        acquire_ok(&mut c, "other/1", 300.0).await;
        let mut seen = Vec::new();
        let mut page_token = String::new();
        let mut pages = 0;
        loop {
            let page = c
                .list_locks(ListLocksRequest { prefix: "batch/".into(), page_size: 500, page_token })
                .await
                .unwrap()
                .into_inner();
            pages += 1;
            for lock in &page.locks {
                assert!(!tokens.contains(&lock.owner), "a token leaked into a listing");
                assert!(lock.fencing_token >= 1 && lock.expires_at.is_some());
                seen.push(lock.resource.clone());
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "duplicates in the listing");
        assert_eq!(seen.len(), 10_000, "omissions in the listing");
        assert!(pages >= 10, "expected paging, got {pages} pages");
        assert!(seen.iter().all(|r| r.starts_with("batch/")));
        s.remove_keys().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_rejects_an_oversized_page_and_a_foreign_page_token() {
    let s = Setup::new(Store::Redis).await;
    let mut c = s.client().await;
    let status = c
        .list_locks(ListLocksRequest {
            page_size: 1001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("page_size:"), "{status:?}");
    let status = c
        .list_locks(ListLocksRequest {
            page_token: "not-a-cursor".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("page_token:"), "{status:?}");
}
