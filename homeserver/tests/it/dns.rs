//! A DNS server on loopback for tests of server discovery: it answers, over UDP, the SRV and
//! address records a test gives it, authoritatively, and "no such name" for any other name.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use hickory_resolver::proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{Name, RData, Record, rdata},
};

pub(crate) struct TestDns {
    pub(crate) addr: SocketAddr,
    records: Arc<Mutex<Vec<Record>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestDns {
    pub(crate) async fn start() -> Self {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let records: Arc<Mutex<Vec<Record>>> = Arc::default();
        let known = records.clone();
        let task = tokio::spawn(async move {
            let mut buffer = vec![0u8; 4096];
            loop {
                let Ok((len, from)) = socket.recv_from(&mut buffer).await else { return };
                let Ok(query) = Message::from_vec(&buffer[..len]) else { continue };
                let answer = answer(&query, &known.lock().unwrap());
                let _ = socket.send_to(&answer.to_vec().unwrap(), from).await;
            }
        });
        Self { addr, records, task }
    }

    /// An SRV record: `name` (`_service._proto.host`) served by `target` on `port`.
    pub(crate) fn srv(&self, name: &str, priority: u16, target: &str, port: u16) {
        let target = Name::from_ascii(format!("{target}.")).unwrap();
        self.add(name, RData::SRV(rdata::SRV::new(priority, 0, port, target)));
    }

    /// An address record.
    pub(crate) fn a(&self, name: &str, ip: Ipv4Addr) {
        self.add(name, RData::A(rdata::A(ip)));
    }

    fn add(&self, name: &str, data: RData) {
        let name = Name::from_ascii(format!("{name}.")).unwrap();
        self.records.lock().unwrap().push(Record::from_rdata(name, 60, data));
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer to `query` from `records`.
fn answer(query: &Message, records: &[Record]) -> Message {
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_authoritative(true);
    let mut name_known = false;
    for question in query.queries() {
        response.add_query(question.clone());
        for record in records.iter().filter(|record| record.name() == question.name()) {
            name_known = true;
            if record.record_type() == question.query_type() {
                response.add_answer(record.clone());
            }
        }
    }
    response.set_response_code(if name_known { ResponseCode::NoError } else { ResponseCode::NXDomain });
    response
}
