//! Tests of the PostgreSQL test harness itself (testkit's `pg`).

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, PgPool};
use testkit::pg::TestPostgres;

async fn select_one(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(conn).await
}

#[tokio::test]
async fn outage_and_recovery() {
    let t = Instant::now();
    let pg = TestPostgres::start().await;
    let started = t.elapsed();
    let pool = PgPool::connect(pg.url()).await.expect("pool");
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .expect("SELECT 1");
    assert_eq!(one, 1);
    let mut conn = PgConnection::connect(pg.url()).await.expect("connect");
    assert_eq!(select_one(&mut conn).await.expect("SELECT 1"), 1);

    if !pg.controls_server() {
        assert!(pg.stop_server().await.is_err());
        return; // TEST_DATABASE_URL: someone else's server, no outage to simulate
    }
    let t = Instant::now();
    pg.stop_server().await.expect("stop_server");
    let stopped = t.elapsed();
    assert!(
        select_one(&mut conn).await.is_err(),
        "query on an old connection must fail"
    );
    assert!(
        PgConnection::connect(pg.url()).await.is_err(),
        "new connections must be refused"
    );
    assert!(
        pg.stop_server().await.is_err(),
        "stopping twice is an error"
    );

    let t = Instant::now();
    pg.start_server().await.expect("start_server");
    let restarted = t.elapsed();
    let mut conn = PgConnection::connect(pg.url())
        .await
        .expect("connect after restart");
    assert_eq!(
        select_one(&mut conn).await.expect("SELECT 1 after restart"),
        1
    );
    // A pool whose connections died reconnects by itself.
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .expect("pool after restart");
    assert_eq!(one, 1);
    eprintln!("timings: start {started:?}, stop {stopped:?}, restart {restarted:?}");
}

#[tokio::test]
async fn instances_are_isolated_and_empty() {
    let (a, b) = tokio::join!(TestPostgres::start(), TestPostgres::start());
    assert_ne!(a.url(), b.url());
    let mut ca = PgConnection::connect(a.url()).await.expect("connect a");
    let mut cb = PgConnection::connect(b.url()).await.expect("connect b");
    let tables = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'";
    for conn in [&mut ca, &mut cb] {
        let n: i64 = sqlx::query_scalar(tables)
            .fetch_one(conn)
            .await
            .expect("count tables");
        assert_eq!(n, 0, "a fresh database has no tables");
    }
    sqlx::raw_sql("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        .execute(&mut ca)
        .await
        .expect("create");
    let x: i32 = sqlx::query_scalar("SELECT x FROM t")
        .fetch_one(&mut ca)
        .await
        .expect("select a");
    assert_eq!(x, 42);
    assert!(
        sqlx::query("SELECT x FROM t")
            .execute(&mut cb)
            .await
            .is_err(),
        "b must not see a's table"
    );
}

#[tokio::test]
async fn drop_stops_the_server_and_removes_its_files() {
    let pg = TestPostgres::start().await;
    let url = pg.url().to_owned();
    let data = pg.data_dir().map(|d| d.to_path_buf());
    PgConnection::connect(&url).await.expect("connect");
    drop(pg);
    if let Some(data) = data {
        assert!(!data.exists(), "{} must be removed", data.display());
    }
    // Private cluster: the server is gone; TEST_DATABASE_URL: the database is dropped.
    assert!(
        PgConnection::connect(&url).await.is_err(),
        "{url} must be gone"
    );
}

/// Panicking test: the cluster is still cleaned up while unwinding.
#[test]
fn panic_cleans_up() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let pg = TestPostgres::start().await;
            let _ = tx.send((pg.url().to_owned(), pg.data_dir().map(|d| d.to_path_buf())));
            panic!("deliberate");
        })
    }));
    assert!(result.is_err());
    let (url, data) = rx.recv().expect("url");
    if let Some(data) = data {
        assert!(!data.exists(), "{} must be removed", data.display());
    }
    assert!(
        rt.block_on(PgConnection::connect(&url)).is_err(),
        "{url} must be gone"
    );
}

/// The harness uses no tokio timers, so a paused clock does not make its waits time out.
#[tokio::test(start_paused = true)]
async fn works_with_a_paused_clock() {
    let pg = TestPostgres::start().await;
    if pg.controls_server() {
        pg.stop_server().await.expect("stop_server");
        pg.start_server().await.expect("start_server");
    }
    tokio::time::sleep(Duration::from_secs(3600)).await; // auto-advances
}
