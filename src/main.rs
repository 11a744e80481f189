use glommio::{LocalExecutorBuilder, Placement};
fn main() {
    let h = LocalExecutorBuilder::new(Placement::Fixed(0)).name("s0").spawn(|| async move {
        let l = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        println!("bound {addr}");
        let t = glommio::spawn_local(async move {
            let mut s = l.accept().await.unwrap();
            use futures_lite::AsyncReadExt;
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.unwrap();
            println!("got {:?}", &b);
        }).detach();
        let mut c = glommio::net::TcpStream::connect(addr).await.unwrap();
        use futures_lite::AsyncWriteExt;
        c.write_all(b"hello").await.unwrap();
        t.await;
    }).unwrap();
    h.join().unwrap();
}
